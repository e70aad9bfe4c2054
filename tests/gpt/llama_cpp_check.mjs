// Runs GGUF files in llama.cpp through node-llama-cpp's prebuilt CPU binaries (nothing is built)
// and writes what it saw, for tests/gpt/test_gguf_export.py to compare with Kettle.
//
//   node llama_cpp_check.mjs NODE_LLAMA_CPP_DIR INPUT.json OUTPUT.json
//
// INPUT: {"models": [{"path", "texts": [str], "chat": str, "prompt": [ids], "new_tokens": n}]}
// OUTPUT: {"models": [{"ids": [[ids] per text], "chat_ids": [ids], "greedy": [ids], "tokens_per_second": x}]}
// `ids` is each text tokenized as user text (special-token strings stay text, as in Kettle);
// `chat_ids` the chat prompt's text tokenized as Ollama does a rendered template (special-token
// strings are those tokens); `greedy` the n tokens temperature 0 decodes after `prompt`.
import {readFileSync, writeFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const [nodeLlamaCppDir, inputPath, outputPath] = process.argv.slice(2);
const {getLlama, LlamaLogLevel} = await import(
    pathToFileURL(join(nodeLlamaCppDir, "node_modules", "node-llama-cpp", "dist", "index.js")).href
);
const input = JSON.parse(readFileSync(inputPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const results = [];
for (const spec of input.models) {
    const model = await llama.loadModel({modelPath: spec.path});
    const ids = spec.texts.map((text) => Array.from(model.tokenize(text, false)));
    const chatIds = Array.from(model.tokenize(spec.chat, true));
    const context = await model.createContext({contextSize: spec.prompt.length + spec.new_tokens, threads: 1});
    const sequence = context.getSequence();
    const greedy = [];
    const start = performance.now();
    for await (const token of sequence.evaluate(spec.prompt, {temperature: 0})) {
        greedy.push(token);
        if (greedy.length === spec.new_tokens) break;
    }
    const seconds = (performance.now() - start) / 1000;
    results.push({ids, chat_ids: chatIds, greedy, tokens_per_second: greedy.length / seconds});
    await context.dispose();
    await model.dispose();
}
writeFileSync(outputPath, JSON.stringify({models: results}));
await llama.dispose();
