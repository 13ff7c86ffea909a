// Writes test/vectors/js.json from the built SDK (run `npm run vectors`,
// which builds first). client-sdk/tests/web_vectors.rs checks the file.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { generateJsVectors } from "./js-vectors.mjs";
import { toJson, vectorsDir } from "../test/helpers/util.mjs";

const path = join(vectorsDir, "js.json");
writeFileSync(path, toJson(await generateJsVectors()));
console.log(`wrote ${path}`);
