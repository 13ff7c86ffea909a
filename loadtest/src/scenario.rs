//! Scenario files: one TOML file describes one call.
//!
//! ```toml
//! name = "meeting-100"
//! participants = 100
//! duration_s = 60          # steady phase, after everyone joined
//!
//! [join]
//! rate_per_s = 10          # ramp: new participants per second
//!
//! [churn]
//! percent_per_min = 0      # leaves per minute, in % of `participants`;
//! rejoin_after_s = 5       # each leaver is replaced after this long
//!
//! [audio]
//! publishers = 100         # participants 0..publishers publish a microphone
//! active_speakers = 3      # participants 0..active_speakers talk; the rest
//! bitrate_kbps = 32        #   send Opus DTX silence (one packet / 400 ms)
//!
//! [camera]
//! publishers = 25          # participants 0..publishers publish a camera
//! simulcast = true
//! layers_kbps = [150, 500, 1500]
//! fps = 30
//!
//! [screen]
//! publishers = 0           # participants 0..publishers share a screen
//! bitrate_kbps = 2500
//! fps = 15
//!
//! [receive]
//! audio_slots = 3
//! video_slots = 4
//! max_layer = 1            # highest simulcast layer asked for (set_quality)
//! ```
//!
//! Roles go by participant index, so participant 0 is the presenter: it
//! holds every role any participant has. Churn only replaces participants
//! that publish no camera or screen and do not speak.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Why a scenario is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid scenario.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// One call to simulate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (results are filed under it).
    pub name: String,
    /// What it models.
    #[serde(default)]
    pub description: String,
    /// Participants in the call at steady state.
    pub participants: u32,
    /// Seconds of steady state after the last initial join.
    pub duration_s: f64,
    /// How participants arrive.
    #[serde(default)]
    pub join: Join,
    /// Leaves and joins during the steady phase.
    #[serde(default)]
    pub churn: Churn,
    /// Microphones.
    #[serde(default)]
    pub audio: Audio,
    /// Cameras.
    #[serde(default)]
    pub camera: Camera,
    /// Screen shares.
    #[serde(default)]
    pub screen: Screen,
    /// What every participant asks the SFU for.
    #[serde(default)]
    pub receive: Receive,
}

/// Arrivals.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Join {
    /// New participants per second during the ramp.
    pub rate_per_s: f64,
}

impl Default for Join {
    fn default() -> Self {
        Self { rate_per_s: 5.0 }
    }
}

/// Churn during the steady phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Leaves per minute as a percentage of `participants`.
    #[serde(default)]
    pub percent_per_min: f64,
    /// A leaver's replacement joins this many seconds later.
    #[serde(default = "default_rejoin")]
    pub rejoin_after_s: f64,
}

fn default_rejoin() -> f64 {
    5.0
}

/// Microphones.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audio {
    /// How many participants publish audio.
    #[serde(default)]
    pub publishers: u32,
    /// How many of them talk all the time (the others send DTX silence).
    #[serde(default)]
    pub active_speakers: u32,
    /// Opus bitrate while talking.
    #[serde(default = "default_audio_kbps")]
    pub bitrate_kbps: f64,
    /// Frame duration.
    #[serde(default = "default_frame_ms")]
    pub frame_ms: u32,
    /// Silent publishers send one small frame per 400 ms (Opus DTX)
    /// instead of full frames.
    #[serde(default = "yes")]
    pub dtx: bool,
}

fn default_audio_kbps() -> f64 {
    32.0
}
fn default_frame_ms() -> u32 {
    20
}
fn yes() -> bool {
    true
}

impl Default for Audio {
    fn default() -> Self {
        Self {
            publishers: 0,
            active_speakers: 0,
            bitrate_kbps: default_audio_kbps(),
            frame_ms: default_frame_ms(),
            dtx: true,
        }
    }
}

/// Cameras.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Camera {
    /// How many participants publish a camera.
    #[serde(default)]
    pub publishers: u32,
    /// Three layers (rids q, h, f) instead of one stream.
    #[serde(default)]
    pub simulcast: bool,
    /// Bitrate of each layer, lowest first (one entry without simulcast).
    #[serde(default = "default_layers")]
    pub layers_kbps: Vec<f64>,
    /// Frames per second.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// A key frame at least this often (the SFU asks for more).
    #[serde(default = "default_key_interval")]
    pub keyframe_interval_s: f64,
}

fn default_layers() -> Vec<f64> {
    vec![150.0, 500.0, 1500.0]
}
fn default_fps() -> f64 {
    30.0
}
fn default_key_interval() -> f64 {
    10.0
}

impl Default for Camera {
    fn default() -> Self {
        Self {
            publishers: 0,
            simulcast: false,
            layers_kbps: default_layers(),
            fps: default_fps(),
            keyframe_interval_s: default_key_interval(),
        }
    }
}

/// Screen shares.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Screen {
    /// How many participants share a screen.
    #[serde(default)]
    pub publishers: u32,
    /// Bitrate.
    #[serde(default = "default_screen_kbps")]
    pub bitrate_kbps: f64,
    /// Frames per second.
    #[serde(default = "default_screen_fps")]
    pub fps: f64,
    /// A key frame at least this often.
    #[serde(default = "default_key_interval")]
    pub keyframe_interval_s: f64,
}

fn default_screen_kbps() -> f64 {
    2500.0
}
fn default_screen_fps() -> f64 {
    15.0
}

impl Default for Screen {
    fn default() -> Self {
        Self {
            publishers: 0,
            bitrate_kbps: default_screen_kbps(),
            fps: default_screen_fps(),
            keyframe_interval_s: default_key_interval(),
        }
    }
}

/// Receive slots.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receive {
    /// Audio receive slots (the SFU grants at most 3).
    #[serde(default = "default_audio_slots")]
    pub audio_slots: u32,
    /// Video receive slots (the SFU grants at most 9).
    #[serde(default = "default_video_slots")]
    pub video_slots: u32,
    /// Highest simulcast layer wanted (0–2).
    #[serde(default = "default_max_layer")]
    pub max_layer: u8,
}

fn default_audio_slots() -> u32 {
    3
}
fn default_video_slots() -> u32 {
    2
}
fn default_max_layer() -> u8 {
    2
}

impl Default for Receive {
    fn default() -> Self {
        Self {
            audio_slots: default_audio_slots(),
            video_slots: default_video_slots(),
            max_layer: default_max_layer(),
        }
    }
}

/// A finite number above zero.
fn positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// What one participant does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Roles {
    /// Publishes a microphone.
    pub audio: bool,
    /// Talks (loud audio level, full-rate frames).
    pub speaker: bool,
    /// Publishes a camera.
    pub camera: bool,
    /// Shares a screen.
    pub screen: bool,
}

impl Roles {
    /// Whether churn may replace this participant.
    pub fn churnable(&self) -> bool {
        !self.speaker && !self.camera && !self.screen
    }
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let s: Scenario = toml::from_str(&text).map_err(|source| ScenarioError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: &str| Err(ScenarioError::Invalid(m.to_owned()));
        if self.participants == 0 || self.participants > 2000 {
            return bad("participants must be 1..=2000");
        }
        if !positive(self.duration_s) {
            return bad("duration_s must be positive");
        }
        if !positive(self.join.rate_per_s) {
            return bad("join.rate_per_s must be positive");
        }
        if self.churn.percent_per_min < 0.0 || self.churn.rejoin_after_s < 0.0 {
            return bad("churn values must not be negative");
        }
        if self.audio.active_speakers > self.audio.publishers {
            return bad("audio.active_speakers exceeds audio.publishers");
        }
        if self.audio.frame_ms == 0 || self.audio.frame_ms > 120 {
            return bad("audio.frame_ms must be 1..=120");
        }
        if self.camera.publishers > 0 {
            let want = if self.camera.simulcast { 3 } else { 1 };
            if self.camera.layers_kbps.len() != want {
                return bad("camera.layers_kbps needs 3 entries with simulcast, 1 without");
            }
            if !positive(self.camera.fps) || self.camera.layers_kbps.iter().any(|k| !positive(*k)) {
                return bad("camera fps and bitrates must be positive");
            }
        }
        if self.screen.publishers > 0
            && !(positive(self.screen.fps) && positive(self.screen.bitrate_kbps))
        {
            return bad("screen fps and bitrate must be positive");
        }
        if self.receive.max_layer > 2 {
            return bad("receive.max_layer must be 0..=2");
        }
        for (what, n) in [
            ("audio", self.audio.publishers),
            ("camera", self.camera.publishers),
            ("screen", self.screen.publishers),
        ] {
            if n > self.participants {
                return Err(ScenarioError::Invalid(format!(
                    "{what}.publishers exceeds participants"
                )));
            }
        }
        Ok(())
    }

    /// Changes the participant count. Publisher counts equal to the old
    /// count follow it ("everyone"); cameras scale proportionally (at
    /// least one if there were any); speakers and screens stay (capped).
    pub fn with_participants(mut self, n: u32) -> Self {
        let old = self.participants;
        let follow = |c: u32| if c == old { n } else { c.min(n) };
        self.audio.publishers = follow(self.audio.publishers);
        self.audio.active_speakers = self.audio.active_speakers.min(self.audio.publishers);
        self.camera.publishers = if self.camera.publishers == old {
            n
        } else if self.camera.publishers > 0 {
            let scaled =
                (f64::from(self.camera.publishers) * f64::from(n) / f64::from(old)).round() as u32;
            scaled.clamp(1, n)
        } else {
            0
        };
        self.screen.publishers = follow(self.screen.publishers);
        self.participants = n;
        self
    }

    /// Multiplies every video and screen bitrate (audio keeps its rate).
    pub fn with_bitrate_scale(mut self, k: f64) -> Self {
        for l in &mut self.camera.layers_kbps {
            *l *= k;
        }
        self.screen.bitrate_kbps *= k;
        self
    }

    /// The roles of participant `index`.
    pub fn roles(&self, index: u32) -> Roles {
        Roles {
            audio: index < self.audio.publishers,
            speaker: index < self.audio.active_speakers,
            camera: index < self.camera.publishers,
            screen: index < self.screen.publishers,
        }
    }

    /// Leaves per minute during the steady phase.
    pub fn leaves_per_min(&self) -> f64 {
        self.churn.percent_per_min / 100.0 * f64::from(self.participants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> Scenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scenarios")
            .join(format!("{name}.toml"));
        match Scenario::load(&path) {
            Ok(s) => s,
            Err(e) => panic!("{name}: {e}"),
        }
    }

    #[test]
    fn shipped_scenarios_load_and_match_the_issue() {
        let m = shipped("meeting-100");
        assert_eq!(m.participants, 100);
        assert_eq!(m.audio.publishers, 100);
        assert_eq!(m.audio.active_speakers, 3);
        assert_eq!(m.camera.publishers, 25);
        assert!(m.camera.simulcast);

        let c = shipped("conference-500");
        assert_eq!(c.participants, 500);
        assert!(c.roles(0).screen && c.roles(0).camera && c.roles(0).speaker);
        assert_eq!(c.audio.publishers, 3);
        assert!((c.screen.bitrate_kbps - 2500.0).abs() < 1e-9);
        assert!((c.churn.percent_per_min - 5.0).abs() < 1e-9);
        assert!(!c.roles(3).audio && c.roles(3).churnable());

        let v = shipped("clinic-2");
        assert_eq!(v.participants, 2);
        assert!(v.roles(0).camera && v.roles(1).camera);
    }

    #[test]
    fn scaling_participants_keeps_the_shape() {
        let m = shipped("meeting-100").with_participants(20);
        assert_eq!(m.audio.publishers, 20);
        assert_eq!(m.camera.publishers, 5);
        assert_eq!(m.audio.active_speakers, 3);
        let c = shipped("conference-500").with_participants(50);
        assert_eq!(c.audio.publishers, 3);
        assert_eq!(c.camera.publishers, 1);
        assert_eq!(c.screen.publishers, 1);
    }

    #[test]
    fn bad_values_are_refused() {
        let mut s = shipped("clinic-2");
        s.audio.active_speakers = 5;
        assert!(s.validate().is_err());
        assert!(
            toml::from_str::<Scenario>("name='x'\nparticipants=2\nduration_s=1\nbogus=1").is_err()
        );
    }
}
