// Bundles with esbuild.
//
// - dist/conclave.mjs: the SDK as an ES module for browsers, workers and
//   node >= 20 (WebCrypto only, no node built-ins). Dependencies (ts-mls,
//   @noble/curves) stay imports, resolved by node or the application's
//   bundler, so the patched ts-mls is the one used.
// - dist/app/: the web app the `conclave` server serves at `/`: app.js (the
//   app with the SDK and its dependencies inlined), media-worker.js (the
//   SFrame encoded-transform worker), index.html and app.css.
import { build } from "esbuild";
import { copyFile, mkdir } from "node:fs/promises";

const common = { bundle: true, format: "esm", target: ["es2022"], sourcemap: true, logLevel: "warning" };

await build({
  ...common,
  entryPoints: ["src/index.ts"],
  outfile: "dist/conclave.mjs",
  platform: "neutral",
  packages: "external",
});

await mkdir("dist/app", { recursive: true });
await build({
  ...common,
  entryPoints: { app: "app/main.ts", "media-worker": "src/media-worker.ts" },
  outdir: "dist/app",
  platform: "browser",
  minify: true,
});
await Promise.all(["index.html", "app.css"].map((f) => copyFile(`app/${f}`, `dist/app/${f}`)));
