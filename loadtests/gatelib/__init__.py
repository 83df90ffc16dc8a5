"""The release gate: locust users (gRPC and HTTP), partner setup, the stack's lifetime, the metering check
against the usage ledger, and the GO / NO-GO verdict. ``loadtests/gate.py`` runs it; ``locustfile.py`` holds
the users locust loads."""
