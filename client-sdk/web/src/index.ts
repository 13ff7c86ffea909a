// Conclave browser SDK: the crypto core (SFrame, KIDs from MLS exports, the MLS agent,
// verification codes), byte-compatible with the Rust SDK.
export * from "./sframe.js";
export * from "./kid.js";
export * from "./verify.js";
export * from "./mls.js";
export * from "./signal.js";
