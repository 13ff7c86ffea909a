// Helpers shared by the tests and the vector generator.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
/** client-sdk/web */
export const webDir = join(here, "..", "..");
export const vectorsDir = join(webDir, "test", "vectors");

export function hex(bytes) {
  return Buffer.from(bytes).toString("hex");
}

export function unhex(s) {
  if (s.length % 2 !== 0 || /[^0-9a-fA-F]/.test(s)) throw new Error(`bad hex ${s}`);
  return new Uint8Array(Buffer.from(s, "hex"));
}

/** JSON.parse that keeps integers beyond 2^53 exact (as strings; read with BigInt). */
export function parseJsonLossless(text) {
  return JSON.parse(text.replace(/([:\[,]\s*)(-?\d{16,})(?=\s*[,\]}])/g, '$1"$2"'));
}

export function readJson(path) {
  return parseJsonLossless(readFileSync(path, "utf8"));
}

/** Serializes with bigints as decimal strings, two-space indent, trailing newline. */
export function toJson(value) {
  return JSON.stringify(value, (_k, v) => (typeof v === "bigint" ? v.toString() : v), 2) + "\n";
}

/**
 * The shared RFC 9605 vector file, `../shared/vectors/sframe-rfc9605.json`
 * beside the repository (or `$CONCLAVE_SHARED/vectors/...`). Returns null if
 * absent; under CI a missing file is an error.
 */
export function rfc9605VectorPath() {
  const shared = process.env.CONCLAVE_SHARED ?? join(webDir, "..", "..", "..", "shared");
  return join(shared, "vectors", "sframe-rfc9605.json");
}
