// The OpenAI-compatible routes from Node.js with the official `openai` package: a streamed chat answer, then an
// embedding (the package asks for base64 by default and decodes it).
//
//   cd examples/node && npm install && SERVING_API_KEY=$(cat ../../var/demo-api-key) node chat.mjs
//
// SERVING_BASE_URL defaults to http://127.0.0.1:8000/v1 (`make run`).
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.SERVING_BASE_URL ?? "http://127.0.0.1:8000/v1",
  apiKey: process.env.SERVING_API_KEY,
});

const stream = await client.chat.completions.create({
  model: "smollm2-135m-instruct",
  messages: [
    { role: "system", content: "Answer in one short sentence." },
    { role: "user", content: "What is the capital of France?" },
  ],
  max_tokens: 32,
  temperature: 0,
  stream: true,
  stream_options: { include_usage: true },
});
let answer = "";
let usage = null;
for await (const chunk of stream) {
  answer += chunk.choices[0]?.delta?.content ?? "";
  usage = chunk.usage ?? usage;
}
console.log(`answer: ${answer.trim()}`);
console.log(`usage: ${JSON.stringify(usage)}`);

const embedding = await client.embeddings.create({ model: "minilm-l6", input: ["hello from node"] });
console.log(`embedding: ${embedding.data[0].embedding.length} dimensions`);
