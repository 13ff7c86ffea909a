//! Conclave's load generator (issue 6): scenario files describe a call,
//! simulated participants do what real clients do (signaling, MLS,
//! WebRTC, SFrame), and the run's numbers come out as JSON and an HTML
//! report. The binary is `conclave-loadtest`; see `README.md` here.

pub mod conclave;
pub mod janus;
pub mod media;
pub mod pacer;
pub mod payload;
pub mod report;
pub mod run;
pub mod scenario;
pub mod server;
pub mod stats;
