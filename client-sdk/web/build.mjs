// Bundles the SDK with esbuild: dist/conclave.mjs (ES module for browsers,
// workers and node >= 20; WebCrypto only, no node built-ins). Dependencies
// (ts-mls, @noble/curves) stay imports: resolved from node_modules by node or
// by the application's bundler, so the patched ts-mls is the one used.
import { build } from "esbuild";

await build({
  entryPoints: ["src/index.ts"],
  outfile: "dist/conclave.mjs",
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: ["es2022"],
  sourcemap: true,
  packages: "external",
  logLevel: "warning",
});
