"""Identity beyond API keys: OAuth2 client credentials (clients, signing keys, access tokens) and scopes."""
