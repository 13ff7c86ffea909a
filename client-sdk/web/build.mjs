// Bundles the SDK with esbuild: dist/conclave.mjs (ES module for browsers,
// workers and node >= 20; WebCrypto only, no node built-ins).
import { build } from "esbuild";

await build({
  entryPoints: ["src/index.ts"],
  outfile: "dist/conclave.mjs",
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: ["es2022"],
  sourcemap: true,
  logLevel: "warning",
});
