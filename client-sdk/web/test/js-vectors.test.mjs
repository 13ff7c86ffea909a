// JS → Rust: the committed test/vectors/js.json must be what this build
// generates (so the file the Rust test checks is current).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { generateJsVectors } from "../scripts/js-vectors.mjs";
import { toJson, vectorsDir } from "./helpers/util.mjs";

test("js.json is up to date with the SDK (else run `npm run vectors`)", async () => {
  const committed = readFileSync(join(vectorsDir, "js.json"), "utf8");
  assert.equal(toJson(await generateJsVectors()), committed);
});
