// llama.cpp, through node-llama-cpp's prebuilt CPU binaries (nothing is built), driven by
// benchmarks/llama_cpp.py one JSON line at a time so that its runs interleave with Kettle's.
//
//   node llama_cpp_driver.mjs NODE_LLAMA_CPP_DIR
//
// stdin, one request a line: {"load": PATH, "context": n, "threads": n}
//                         or {"run": PATH, "prompt": [ids], "new_tokens": n}
// stdout, one answer a line: {"loaded": PATH} or {"tokens": [ids], "ttft_s": x, "decode_s": x}
// where ttft_s is the prompt's evaluation to the first new token and decode_s the rest.
import {createInterface} from "node:readline";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const [nodeLlamaCppDir] = process.argv.slice(2);
const {getLlama, LlamaLogLevel} = await import(
    pathToFileURL(join(nodeLlamaCppDir, "node_modules", "node-llama-cpp", "dist", "index.js")).href
);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const loaded = new Map();  // path -> {model, context}

for await (const line of createInterface({input: process.stdin})) {
    const request = JSON.parse(line);
    if (request.load) {
        const model = await llama.loadModel({modelPath: request.load});
        const context = await model.createContext({
            contextSize: request.context,
            threads: request.threads,
            batchSize: request.context,
        });
        loaded.set(request.load, {model, context});
        process.stdout.write(JSON.stringify({loaded: request.load}) + "\n");
        continue;
    }
    const {context} = loaded.get(request.run);
    const sequence = context.getSequence();
    const tokens = [];
    const start = performance.now();
    let first = null;
    for await (const token of sequence.evaluate(request.prompt, {temperature: 0})) {
        if (first === null) first = performance.now();
        tokens.push(token);
        if (tokens.length === request.new_tokens) break;
    }
    const end = performance.now();
    sequence.dispose();
    process.stdout.write(JSON.stringify({tokens, ttft_s: (first - start) / 1000, decode_s: (end - first) / 1000}) + "\n");
}
for (const {model, context} of loaded.values()) {
    await context.dispose();
    await model.dispose();
}
await llama.dispose();
