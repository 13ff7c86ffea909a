//! The HTML report: the headline numbers and inline SVG charts, one file
//! with no scripts and nothing fetched.

use std::fmt::Write as _;

use crate::payload::Source;
use crate::run::RunResult;
use crate::stats::Summary;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

/// A transit summary as `p50 / p95 / p99; share over 20 ms`.
/// A count for the whole run and for the steady phase, "–" where unknown.
fn whole_and_steady(whole: Option<u64>, steady: Option<u64>) -> String {
    let n = |v: Option<u64>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
    format!("{}; steady phase {}", n(whole), n(steady))
}

fn transit_cell(t: Option<&crate::server::TransitSummary>) -> String {
    t.map_or_else(
        || "–".to_owned(),
        |t| {
            format!(
                "{} / {} / {}; {}%",
                num(t.p50_at_most_ms, 2),
                num(t.p95_at_most_ms, 2),
                num(t.p99_at_most_ms, 2),
                num(t.over_20ms_percent, 3)
            )
        },
    )
}

fn summary_row(name: &str, unit: &str, s: &Summary) -> String {
    format!(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        esc(name),
        s.count,
        num(s.p50, 1),
        num(s.p95, 1),
        num(s.p99, 1),
        num(s.max, 1),
        esc(unit)
    )
}

/// One series of a line chart.
struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

/// A line chart as inline SVG.
fn line_chart(title: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let (w, h) = (720.0, 240.0);
    let (left, right, top, bottom) = (64.0, 16.0, 28.0, 36.0);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let x_max = pts.clone().map(|p| p.0).fold(1.0f64, f64::max);
    let y_max = pts
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let y_max = if y_max <= 0.0 { 1.0 } else { y_max * 1.1 };
    let sx = |x: f64| left + x / x_max * (w - left - right);
    let sy = |y: f64| top + (1.0 - y / y_max) * (h - top - bottom);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t}">"#,
        t = esc(title)
    );
    let _ = write!(
        svg,
        r#"<text x="{left}" y="16" font-size="13" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let y = sy(v);
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            w - right,
            left - 4.0,
            y + 3.0,
            short(v)
        );
    }
    for i in 0..=5 {
        let v = x_max * f64::from(i) / 5.0;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" font-size="10" text-anchor="middle">{:.0}s</text>"#,
            sx(v),
            h - bottom + 14.0,
            v
        );
    }
    let _ = write!(
        svg,
        r#"<text x="12" y="{:.1}" font-size="10" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}</text>"#,
        h / 2.0,
        h / 2.0,
        esc(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        if !path.is_empty() {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                s.color,
                path.join(" ")
            );
        }
        let lx = left + 10.0 + 150.0 * i as f64;
        let _ = write!(
            svg,
            r#"<rect x="{lx}" y="{}" width="10" height="3" fill="{}"/><text x="{}" y="{}" font-size="10">{}</text>"#,
            h - 10.0,
            s.color,
            lx + 14.0,
            h - 6.0,
            esc(s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn short(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// How a report names the receive buffer of the participants' sockets.
pub fn recv_buffer_label(bytes: usize) -> String {
    if bytes == 0 {
        "the kernel's default".to_owned()
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

/// How a report names the participants' video pacing.
pub fn pacing_label(factor: f64) -> String {
    if factor > 0.0 {
        format!(
            "{factor}x its video bitrate, {} ms bursts",
            crate::pacer::BURST_WINDOW.as_millis()
        )
    } else {
        "none (each frame's packets at once)".to_owned()
    }
}

/// How a report names the load generator's CPU priority.
pub fn scheduling_label(nice: i32, idle: bool) -> String {
    if idle {
        "SCHED_IDLE: only cores the server leaves free".to_owned()
    } else {
        format!("niceness {nice}")
    }
}

/// Key frames sent by source, camera first: `camera 12, screen 3`, or
/// `none`.
pub fn key_frames_label(by_source: &std::collections::HashMap<Source, u64>) -> String {
    let parts: Vec<String> = [(Source::Camera, "camera"), (Source::Screen, "screen")]
        .into_iter()
        .filter_map(|(s, name)| by_source.get(&s).map(|n| format!("{name} {n}")))
        .collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Renders the report.
pub fn html(r: &RunResult) -> String {
    let st = &r.server_timeline;
    let mt = &r.media.timeline;
    let pts = |f: &dyn Fn(&crate::run::ServerSecond) -> f64| -> Vec<(f64, f64)> {
        st.iter().map(|x| (x.t_s, f(x))).collect()
    };
    let mpts = |f: &dyn Fn(&crate::media::MediaSecond) -> Option<f64>| -> Vec<(f64, f64)> {
        mt.iter().filter_map(|x| Some((x.t_s, f(x)?))).collect()
    };
    let charts = [
        line_chart(
            "CPU (percent of one core)",
            "%",
            &[
                Series {
                    name: "server (SFU + signaling)",
                    color: "#c0392b",
                    points: pts(&|x| x.cpu_percent),
                },
                Series {
                    name: "load generator",
                    color: "#7f8c8d",
                    points: pts(&|x| x.loadgen_cpu_percent),
                },
            ],
        ),
        line_chart(
            "SFU packets per second",
            "packets/s",
            &[
                Series {
                    name: "in",
                    color: "#2980b9",
                    points: pts(&|x| x.packets_in_per_s),
                },
                Series {
                    name: "out",
                    color: "#27ae60",
                    points: pts(&|x| x.packets_out_per_s),
                },
            ],
        ),
        line_chart(
            "SFU bits per second",
            "bit/s",
            &[
                Series {
                    name: "in",
                    color: "#2980b9",
                    points: pts(&|x| x.bits_in_per_s),
                },
                Series {
                    name: "out",
                    color: "#27ae60",
                    points: pts(&|x| x.bits_out_per_s),
                },
            ],
        ),
        line_chart(
            "End-to-end frame latency",
            "ms",
            &[
                Series {
                    name: "p50",
                    color: "#8e44ad",
                    points: mpts(&|x| x.latency_p50_ms),
                },
                Series {
                    name: "p95",
                    color: "#d35400",
                    points: mpts(&|x| x.latency_p95_ms),
                },
            ],
        ),
        line_chart(
            "Participants",
            "count",
            &[
                Series {
                    name: "in the MLS group",
                    color: "#16a085",
                    points: pts(&|x| f64::from(x.members)),
                },
                Series {
                    name: "media connected",
                    color: "#2c3e50",
                    points: mpts(&|x| Some(f64::from(x.connected))),
                },
            ],
        ),
        line_chart(
            "Packet loss at receivers and decryption failures",
            "per second",
            &[
                Series {
                    name: "RTP packets lost",
                    color: "#e67e22",
                    points: mpts(&|x| Some(x.rtp_lost as f64)),
                },
                Series {
                    name: "decrypt failures",
                    color: "#c0392b",
                    points: mpts(&|x| Some(x.decrypt_failures as f64)),
                },
            ],
        ),
        line_chart(
            "RSS of the server",
            "MiB",
            &[Series {
                name: "RSS",
                color: "#34495e",
                points: pts(&|x| x.rss_mib),
            }],
        ),
    ];

    let m = &r.media;
    let srv = &r.server;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Conclave load test: {name}</title>\
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:800px}}table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}svg{{display:block;margin:1em 0}}</style>\
</head><body><h1>Conclave load test: {name}</h1><p>{desc}</p>",
        name = esc(&r.scenario.name),
        desc = esc(&r.scenario.description)
    );
    let _ = write!(
        h,
        "<p>{} participants, ramp {:.1} s, steady phase measured {:.1}–{:.1} s, video bitrate ×{}, one received frame in {} decrypted. Started at Unix time {}.</p>",
        r.scenario.participants,
        r.ramp_s,
        srv.window_s.0,
        srv.window_s.1,
        r.bitrate_scale,
        m.decrypt_every,
        r.started_unix
    );
    h.push_str("<h2>Latencies</h2><table><tr><th>measure</th><th>n</th><th>p50</th><th>p95</th><th>p99</th><th>max</th><th>unit</th></tr>");
    for (name, s) in [
        ("join (connect → group key and media up)", &r.join.join_ms),
        ("join: MLS group", &r.join.mls_ms),
        ("join: media connected", &r.join.media_ms),
        ("join: first frame decrypted", &r.join.first_frame_ms),
        (
            "leave → all members rekeyed",
            &r.rekey.leave_to_all_rekeyed_ms,
        ),
        (
            "leave → all members epoch_ready",
            &r.rekey.leave_to_all_epoch_ready_ms,
        ),
        ("frame latency, all", &m.latency_ms),
        ("frame latency, steady phase", &m.latency_steady_ms),
        ("frame latency, audio", &m.latency_audio_ms),
        ("frame latency, video", &m.latency_video_ms),
    ] {
        h.push_str(&summary_row(name, "ms", s));
    }
    h.push_str("</table><h2>Counts</h2><table>");
    let rows: Vec<(&str, String)> = vec![
        (
            "joins attempted / completed / failed / still under way at the end",
            format!(
                "{} / {} / {} / {}",
                r.join.attempted, r.join.completed, r.join.failed, r.join.unfinished
            ),
        ),
        (
            "leaves watched (incomplete)",
            format!("{} ({})", r.rekey.leaves, r.rekey.incomplete),
        ),
        (
            "frames sent",
            m.frames_sent.values().sum::<u64>().to_string(),
        ),
        (
            "key frames sent",
            format!(
                "{} ({})",
                m.key_frames_sent,
                key_frames_label(&m.key_frames_by_source)
            ),
        ),
        (
            "frames received / decrypted",
            format!("{} / {}", m.frames_received, m.frames_decrypted),
        ),
        (
            "decryption failures (sent before the receiver joined / other unknown key / auth / replay / other)",
            format!(
                "{} ({} / {} / {} / {} / {})",
                m.decrypt_failures,
                m.decrypt_failures_before_join,
                m.decrypt_failures_unknown_key,
                m.decrypt_failures_auth,
                m.decrypt_failures_replay,
                m.decrypt_failures_other
            ),
        ),
        (
            "incomplete video frames",
            m.video_frames_incomplete.to_string(),
        ),
        (
            "RTP packet loss at receivers",
            format!(
                "{} of {} ({}%); steady phase {}%",
                m.rtp_lost,
                m.rtp_expected,
                num(r.loss_percent, 3),
                num(r.loss_percent_steady, 3)
            ),
        ),
        (
            "datagrams dropped by the kernel at full receive buffers (SFU and load generator)",
            whole_and_steady(r.kernel_udp_drops, r.kernel_udp_drops_steady),
        ),
        (
            "of them at the SFU's own sockets",
            whole_and_steady(r.sfu_socket_drops, r.sfu_socket_drops_steady),
        ),
        (
            "SFU CPU mean / max (% of a core)",
            format!("{:.1} / {:.1}", srv.cpu_percent_mean, srv.cpu_percent_max),
        ),
        ("SFU RSS max (MiB)", format!("{:.1}", srv.rss_mib_max)),
        (
            "SFU packets/s in / out (its /metrics)",
            format!("{:.0} / {:.0}", srv.packets_in_per_s, srv.packets_out_per_s),
        ),
        (
            "SFU datagrams out in UDP GSO sends (%)",
            srv.gso_percent
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}")),
        ),
        (
            "SFU Mbit/s in / out (its /metrics)",
            format!(
                "{:.2} / {:.2}",
                srv.bits_in_per_s / 1e6,
                srv.bits_out_per_s / 1e6
            ),
        ),
        (
            "sent to / received from the SFU by the load generator, packets/s",
            format!(
                "{:.0} / {:.0}",
                srv.loadgen_packets_to_sfu_per_s, srv.loadgen_packets_from_sfu_per_s
            ),
        ),
        (
            "sent to / received from the SFU by the load generator, Mbit/s",
            format!(
                "{:.2} / {:.2}",
                srv.loadgen_bits_to_sfu_per_s / 1e6,
                srv.loadgen_bits_from_sfu_per_s / 1e6
            ),
        ),
        (
            "RTP packets forwarded/s",
            format!("{:.0}", srv.forwarded_per_s),
        ),
        (
            "server CPU µs per forwarded packet",
            num(srv.cpu_us_per_forwarded_packet, 1),
        ),
        (
            "time in the SFU per forwarded packet (socket arrival → every copy sent), ms: p50 / p95 / p99 at most; share over 20 ms",
            transit_cell(srv.sfu_transit.as_ref()),
        ),
        (
            "… audio packets only",
            transit_cell(srv.sfu_transit_audio.as_ref()),
        ),
        (
            "… video packets only (camera, screen share)",
            transit_cell(srv.sfu_transit_video.as_ref()),
        ),
        ("SFU drops in window", format!("{:.0}", srv.drops)),
        ("SFU drops over the run, by reason", {
            let mut v: Vec<String> = r
                .sfu_drops_by_reason
                .iter()
                .filter(|(_, n)| **n > 0.0)
                .map(|(k, n)| format!("{k} {n:.0}"))
                .collect();
            v.sort();
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        }),
        (
            "load generator CPU mean (% of a core)",
            format!("{:.1}", srv.loadgen_cpu_percent_mean),
        ),
        (
            "load generator CPU priority (niceness 0: the same as the server)",
            scheduling_label(r.generator_nice, r.generator_idle),
        ),
        (
            "receive buffer of each participant's socket",
            recv_buffer_label(r.socket_recv_buffer),
        ),
        (
            "video pacing of each participant",
            pacing_label(r.pace_factor),
        ),
        ("MLS commits sent", r.commits_sent.to_string()),
    ];
    for (k, v) in rows {
        let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v));
    }
    h.push_str("</table>");
    if !r.join.errors.is_empty() {
        h.push_str("<h2>Join errors</h2><ul>");
        for e in &r.join.errors {
            let _ = write!(h, "<li>{}</li>", esc(e));
        }
        h.push_str("</ul>");
    }
    h.push_str("<h2>Over time</h2>");
    for c in charts {
        h.push_str(&c);
    }
    h.push_str("<p>Server figures are for the whole server process (embedded SFU and signaling); CPU from /proc/&lt;pid&gt;/stat, packet and byte counters from its /metrics. Raw data: result.json.</p></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_scale_and_escape() {
        let svg = line_chart(
            "a < b",
            "ms",
            &[Series {
                name: "x",
                color: "#000",
                points: vec![(0.0, 1.0), (10.0, 5.0)],
            }],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("a &lt; b"));
        assert!(svg.contains("<polyline"));
        assert_eq!(short(2_500_000.0), "2.5M");
    }

    #[test]
    fn key_frames_are_named_by_source() {
        let mut by = std::collections::HashMap::new();
        assert_eq!(key_frames_label(&by), "none");
        by.insert(Source::Screen, 3);
        by.insert(Source::Camera, 12);
        assert_eq!(key_frames_label(&by), "camera 12, screen 3");
    }

    #[test]
    fn the_generator_priority_is_named() {
        assert_eq!(scheduling_label(10, false), "niceness 10");
        assert!(scheduling_label(10, true).starts_with("SCHED_IDLE"));
    }
}

/// One line of the side-by-side.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ComparisonRow {
    /// What is compared.
    pub name: String,
    /// Conclave's value.
    pub conclave: String,
    /// Janus's value.
    pub janus: String,
    /// Conclave ÷ Janus, where it means something.
    pub ratio: String,
}

/// The side-by-side numbers of a Conclave run and a Janus run of one scenario.
pub fn comparison_rows(c: &RunResult, j: &RunResult) -> Vec<ComparisonRow> {
    let row = |name: &str, a: Option<f64>, b: Option<f64>, digits: usize, ratio: bool| {
        let r = match (a, b) {
            (Some(a), Some(b)) if ratio && b > 0.0 => format!("{:.2}", a / b),
            _ => "–".to_owned(),
        };
        ComparisonRow {
            name: name.to_owned(),
            conclave: num(a, digits),
            janus: num(b, digits),
            ratio: r,
        }
    };
    let (cs, js) = (&c.server, &j.server);
    let (cm, jm) = (&c.media, &j.media);
    vec![
        row(
            "SFU CPU per datagram delivered, µs",
            cs.cpu_us_per_delivered_datagram,
            js.cpu_us_per_delivered_datagram,
            2,
            true,
        ),
        row(
            "SFU CPU, % of one core (steady phase)",
            Some(cs.cpu_percent_mean),
            Some(js.cpu_percent_mean),
            1,
            true,
        ),
        row(
            "SFU memory per participant, KiB",
            cs.kib_per_participant,
            js.kib_per_participant,
            0,
            true,
        ),
        row(
            "SFU RSS, largest, MiB",
            Some(cs.rss_mib_max),
            Some(js.rss_mib_max),
            1,
            true,
        ),
        row(
            "datagrams delivered to receivers, per s",
            Some(cs.loadgen_packets_from_sfu_per_s),
            Some(js.loadgen_packets_from_sfu_per_s),
            0,
            true,
        ),
        row(
            "bits delivered to receivers, Mbit/s",
            Some(cs.loadgen_bits_from_sfu_per_s / 1e6),
            Some(js.loadgen_bits_from_sfu_per_s / 1e6),
            2,
            true,
        ),
        row(
            "RTP loss at receivers, steady phase, %",
            c.loss_percent_steady,
            j.loss_percent_steady,
            3,
            false,
        ),
        row(
            "RTP loss at receivers, whole run, %",
            c.loss_percent,
            j.loss_percent,
            3,
            false,
        ),
        row(
            "datagrams the kernel dropped (full receive buffers)",
            c.kernel_udp_drops.map(|v| v as f64),
            j.kernel_udp_drops.map(|v| v as f64),
            0,
            false,
        ),
        row(
            "of them at the SFU's own sockets",
            c.sfu_socket_drops.map(|v| v as f64),
            j.sfu_socket_drops.map(|v| v as f64),
            0,
            false,
        ),
        row(
            "frame latency p50, steady phase, ms",
            cm.latency_steady_ms.p50,
            jm.latency_steady_ms.p50,
            1,
            false,
        ),
        row(
            "frame latency p95, steady phase, ms",
            cm.latency_steady_ms.p95,
            jm.latency_steady_ms.p95,
            1,
            false,
        ),
        row(
            "frame latency p99, steady phase, ms",
            cm.latency_steady_ms.p99,
            jm.latency_steady_ms.p99,
            1,
            false,
        ),
        row(
            "frame latency p50, whole run, ms",
            cm.latency_ms.p50,
            jm.latency_ms.p50,
            1,
            false,
        ),
        row(
            "frame latency p95, whole run, ms",
            cm.latency_ms.p95,
            jm.latency_ms.p95,
            1,
            false,
        ),
        row(
            "frame latency p99, whole run, ms",
            cm.latency_ms.p99,
            jm.latency_ms.p99,
            1,
            false,
        ),
        row(
            "join p50, ms (Conclave: with MLS)",
            c.join.join_ms.p50,
            j.join.join_ms.p50,
            0,
            false,
        ),
        row(
            "join p95, ms (Conclave: with MLS)",
            c.join.join_ms.p95,
            j.join.join_ms.p95,
            0,
            false,
        ),
        row(
            "joins completed / attempted",
            Some(c.join.completed as f64 / c.join.attempted.max(1) as f64),
            Some(j.join.completed as f64 / j.join.attempted.max(1) as f64),
            3,
            false,
        ),
        row(
            "frames decrypted",
            Some(cm.frames_decrypted as f64),
            Some(jm.frames_decrypted as f64),
            0,
            false,
        ),
        row(
            "decryption failures",
            Some(cm.decrypt_failures as f64),
            Some(jm.decrypt_failures as f64),
            0,
            false,
        ),
        row(
            "load generator niceness (0: same CPU priority as the SFU)",
            Some(f64::from(c.generator_nice)),
            Some(f64::from(j.generator_nice)),
            0,
            false,
        ),
        row(
            "load generator under SCHED_IDLE (1: yes)",
            Some(f64::from(u8::from(c.generator_idle))),
            Some(f64::from(u8::from(j.generator_idle))),
            0,
            false,
        ),
    ]
}

/// The side-by-side page.
pub fn comparison_html(c: &RunResult, j: &RunResult) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{name}: Conclave and Janus</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style></head><body>\
         <h1>{name}: Conclave and Janus VideoRoom, side by side</h1>\
         <p>{n} participants, video bitrate ×{scale}, steady phase {dur} s, on the same machine one after the other. \
         Both runs use the same simulated participants, the same media and the same SFrame work; against Janus the \
         SFrame key is fixed for the run (Janus has no MLS delivery service), and the Conclave process also runs \
         signaling and MLS delivery. Ratios are Conclave ÷ Janus.</p>\
         <table><tr><th>measure</th><th>Conclave</th><th>Janus</th><th>ratio</th></tr>",
        name = esc(&c.scenario.name),
        n = c.scenario.participants,
        scale = c.bitrate_scale,
        dur = c.scenario.duration_s,
    );
    for r in comparison_rows(c, j) {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.name),
            esc(&r.conclave),
            esc(&r.janus),
            esc(&r.ratio)
        );
    }
    let cpu = |r: &RunResult| -> Vec<(f64, f64)> {
        r.server_timeline
            .iter()
            .map(|x| (x.t_s, x.cpu_percent))
            .collect()
    };
    let rss = |r: &RunResult| -> Vec<(f64, f64)> {
        r.server_timeline
            .iter()
            .map(|x| (x.t_s, x.rss_mib))
            .collect()
    };
    out.push_str("</table>");
    out.push_str(&line_chart(
        "SFU CPU",
        "% of one core",
        &[
            Series {
                name: "Conclave",
                color: "#1f77b4",
                points: cpu(c),
            },
            Series {
                name: "Janus",
                color: "#d62728",
                points: cpu(j),
            },
        ],
    ));
    out.push_str(&line_chart(
        "SFU memory",
        "RSS MiB",
        &[
            Series {
                name: "Conclave",
                color: "#1f77b4",
                points: rss(c),
            },
            Series {
                name: "Janus",
                color: "#d62728",
                points: rss(j),
            },
        ],
    ));
    out.push_str("</body></html>\n");
    out
}
