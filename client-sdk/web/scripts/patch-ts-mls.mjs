// Makes ts-mls 1.6.4 read the `external_senders` group-context extension as
// RFC 9420 §12.1.8.1 defines it: ONE extension holding a *list* of
// ExternalSender (`ExternalSender external_senders<V>`), which is what mls-rs
// (and so the Conclave server and the Rust SDK) writes. Unpatched, ts-mls
// reads each extension as a single ExternalSender: creating a group with the
// RFC encoding throws, and every proposal signed by the server fails with
// "Could not decode ExternalSender".
//
// Run automatically by `npm install` / `npm ci` (the `postinstall` script).
// It rewrites three functions in node_modules/ts-mls, is idempotent, and
// fails loudly (exit code 1) if ts-mls is not the version it was written for
// or the code it replaces is not found — never silently half-patched.
//
//   senderFromExtension     (publicMessage.js)    verifying a server proposal
//   validateExternalSenders (clientState.js)      createGroup, GCE proposals
//   proposeExternal         (externalProposal.js) acting as external sender (tests)
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const EXPECTED_VERSION = "1.6.4";
const MARKER = "/* conclave-patch: external_senders is a list (RFC 9420 12.1.8.1) */";
const IMPORT = 'import { decodeVarLenType as conclaveDecodeList } from "./codec/variableLength.js";';

const here = dirname(fileURLToPath(import.meta.url));
const webDir = join(here, "..");

function fail(msg) {
  console.error(`patch-ts-mls: ${msg}`);
  process.exit(1);
}

let pkgDir;
try {
  const require = createRequire(join(webDir, "package.json"));
  pkgDir = dirname(require.resolve("ts-mls/package.json"));
} catch {
  // Some ts-mls builds do not export package.json; fall back to the usual place.
  pkgDir = join(webDir, "node_modules", "ts-mls");
}
let version;
try {
  version = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")).version;
} catch (e) {
  fail(`ts-mls is not installed (${e.message})`);
}
if (version !== EXPECTED_VERSION) {
  fail(`written for ts-mls ${EXPECTED_VERSION}, found ${version}: re-check the external_senders encoding and update this script`);
}

const patches = [
  {
    file: "publicMessage.js",
    from: `export function senderFromExtension(extensions, senderIndex) {
    const externalSenderExtensions = extensions.filter((ex) => ex.extensionType === "external_senders");
    const externalSenderExtension = externalSenderExtensions[senderIndex];
    if (externalSenderExtension !== undefined) {
        const externalSender = decodeExternalSender(externalSenderExtension.extensionData, 0);
        if (externalSender === undefined)
            throw new CodecError("Could not decode ExternalSender");
        return externalSender[0];
    }
}`,
    to: `export function senderFromExtension(extensions, senderIndex) {
    ${MARKER}
    const externalSenderExtension = extensions.find((ex) => ex.extensionType === "external_senders");
    if (externalSenderExtension === undefined)
        return undefined;
    const data = externalSenderExtension.extensionData;
    const decoded = conclaveDecodeList(decodeExternalSender)(data, 0);
    if (decoded === undefined || decoded[1] !== data.length)
        throw new CodecError("Could not decode ExternalSender");
    return decoded[0][senderIndex];
}`,
  },
  {
    file: "clientState.js",
    from: `async function validateExternalSenders(extensions, authService) {
    const externalSenders = extensions.filter((e) => e.extensionType === "external_senders");
    for (const externalSender of externalSenders) {
        const decoded = decodeExternalSender(externalSender.extensionData, 0);
        if (decoded === undefined)
            return new CodecError("Could not decode external_senders");
        const validCredential = await authService.validateCredential(decoded[0].credential, decoded[0].signaturePublicKey);
        if (!validCredential)
            return new ValidationError("Could not validate external credential");
    }
}`,
    to: `async function validateExternalSenders(extensions, authService) {
    ${MARKER}
    const externalSenders = extensions.filter((e) => e.extensionType === "external_senders");
    if (externalSenders.length > 1)
        return new ValidationError("More than one external_senders extension");
    for (const externalSender of externalSenders) {
        const data = externalSender.extensionData;
        const decoded = conclaveDecodeList(decodeExternalSender)(data, 0);
        if (decoded === undefined || decoded[1] !== data.length)
            return new CodecError("Could not decode external_senders");
        for (const sender of decoded[0]) {
            const validCredential = await authService.validateCredential(sender.credential, sender.signaturePublicKey);
            if (!validCredential)
                return new ValidationError("Could not validate external credential");
        }
    }
}`,
  },
  {
    file: "externalProposal.js",
    from: `    const externalSenderExtensionIndex = groupInfo.groupContext.extensions.findIndex((ex) => {
        if (ex.extensionType !== "external_senders")
            return false;
        const decoded = decodeExternalSender(ex.extensionData, 0);
        if (decoded === undefined)
            throw new ValidationError("Could not decode external_sender extension");
        return constantTimeEqual(decoded[0].signaturePublicKey, signaturePublicKey);
    });`,
    to: `    ${MARKER}
    const externalSendersExtension = groupInfo.groupContext.extensions.find((ex) => ex.extensionType === "external_senders");
    let externalSenderExtensionIndex = -1;
    if (externalSendersExtension !== undefined) {
        const data = externalSendersExtension.extensionData;
        const decoded = conclaveDecodeList(decodeExternalSender)(data, 0);
        if (decoded === undefined || decoded[1] !== data.length)
            throw new ValidationError("Could not decode external_sender extension");
        externalSenderExtensionIndex = decoded[0].findIndex((s) => constantTimeEqual(s.signaturePublicKey, signaturePublicKey));
    }`,
  },
];

let changed = 0;
for (const p of patches) {
  const path = join(pkgDir, "dist", "src", p.file);
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    fail(`cannot read ${path}: ${e.message}`);
  }
  if (text.includes(MARKER)) {
    if (!text.includes(p.to) || !text.includes(IMPORT)) fail(`${p.file} carries the marker but not this patch`);
    continue;
  }
  const at = text.indexOf(p.from);
  if (at < 0 || text.indexOf(p.from, at + 1) >= 0) {
    fail(`target code not found exactly once in ${path}; ts-mls changed? Refusing to run unpatched.`);
  }
  text = `${IMPORT}\n${text.replace(p.from, p.to)}`;
  writeFileSync(path, text);
  changed++;
}
console.log(
  changed === 0
    ? `patch-ts-mls: ts-mls ${version} already patched (external_senders as an RFC 9420 list)`
    : `patch-ts-mls: patched ${changed} file(s) of ts-mls ${version} (external_senders as an RFC 9420 list)`,
);
