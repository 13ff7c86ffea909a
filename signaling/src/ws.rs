//! One WebSocket per client session: authenticate, then relay between the
//! client and the calls it joins. Every inbound frame is validated before it
//! can touch state; malformed input gets a typed error, floods get
//! rate-limited and then disconnected.

use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use conclave_protocol::mls::{Principal, encode_signing_identity, validate_key_package};
use conclave_protocol::signal::{
    Bytes, ClientEnvelope, ClientMessage, ErrorCode, MAX_CLIENT_MESSAGE, MediaSource,
    RemovalReason, ServerMessage,
};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

use crate::AppState;
use crate::auth::{Claims, TokenKind};
use crate::call::{JoinLimits, RecorderSeat, Refusal, SessionId};
use crate::hub::{CallInput, SessionFrame, refusal};
use crate::sfu::{PublishRights, Source};

/// `?token=` on the WebSocket URL (browsers cannot set headers on WebSockets).
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    token: String,
}

/// `GET /ws?token=...`: upgrades an authenticated client.
pub async fn upgrade(
    State(app): State<AppState>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let Ok(claims) = crate::api::authenticate(&app, &q.token).await else {
        return (StatusCode::UNAUTHORIZED, "invalid or expired token").into_response();
    };
    if claims.kind == TokenKind::Admin {
        return (StatusCode::FORBIDDEN, "admin tokens cannot join calls").into_response();
    }
    ws.max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| session(app, claims, socket))
}

/// Token bucket: `RATE` messages per second, bursts of `BURST`; a session
/// that keeps flooding after `MAX_STRIKES` refusals is disconnected.
struct RateLimiter {
    tokens: f64,
    last: Instant,
    strikes: u32,
}

const RATE: f64 = 50.0;
const BURST: f64 = 200.0;
const MAX_STRIKES: u32 = 100;

impl RateLimiter {
    fn new() -> Self {
        Self {
            tokens: BURST,
            last: Instant::now(),
            strikes: 0,
        }
    }

    /// `Ok` to process, `Err(true)` to disconnect, `Err(false)` to refuse.
    fn admit(&mut self) -> Result<(), bool> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * RATE).min(BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            Ok(())
        } else {
            self.strikes += 1;
            Err(self.strikes > MAX_STRIKES)
        }
    }
}

async fn session(app: AppState, claims: Claims, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (sid, mut outbox) = app.hub.open_session(&claims.sub);
    tracing::debug!(session = sid, user = %claims.sub, "session opened");
    let external_sender =
        encode_signing_identity(app.hub.server_identity().signing_identity()).unwrap_or_default();
    app.hub.send(
        sid,
        None,
        ServerMessage::Ready {
            user_id: claims.sub.clone(),
            external_sender: Bytes(external_sender),
        },
    );

    let writer = tokio::spawn(async move {
        while let Some(frame) = outbox.recv().await {
            match frame {
                SessionFrame::Text(t) => {
                    if sink.send(Message::Text(t)).await.is_err() {
                        break;
                    }
                }
                SessionFrame::Binary(b) => {
                    if sink.send(Message::Binary(b)).await.is_err() {
                        break;
                    }
                }
                SessionFrame::Close(reason) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: 4000,
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
            }
        }
    });

    let mut limiter = RateLimiter::new();
    let mut writer = writer;
    let writer_done = loop {
        tokio::select! {
            _ = &mut writer => break true,
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { break false };
                let text = match frame {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        app.hub.refuse(sid, None, refusal(ErrorCode::BadRequest, "binary frames are not part of the protocol"));
                        continue;
                    }
                    Message::Close(_) => break false,
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                match limiter.admit() {
                    Ok(()) => handle_text(&app, sid, &claims, text.as_str()).await,
                    Err(false) => app.hub.refuse(sid, None, refusal(ErrorCode::RateLimited, "slow down")),
                    Err(true) => {
                        tracing::warn!(session = sid, user = %claims.sub, "flooding: disconnecting");
                        app.hub.close_user_session(sid, "rate limit exceeded");
                    }
                }
            }
        }
    };
    // Forget the session (its calls rekey without it); the writer drains
    // what is queued, then ends when its outbox closes.
    app.hub.close_session(sid);
    if !writer_done
        && tokio::time::timeout(std::time::Duration::from_secs(2), &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
    tracing::debug!(session = sid, "session closed");
}

async fn handle_text(app: &AppState, sid: SessionId, claims: &Claims, text: &str) {
    let env = match ClientEnvelope::decode(text) {
        Ok(env) => env,
        Err(e) => {
            app.hub.refuse(sid, None, refusal(e.code(), e.to_string()));
            return;
        }
    };
    app.metrics
        .messages_in
        .with_label_values(&[crate::metrics::client_kind(&env.msg)])
        .inc();
    let id = env.id;
    let hub = &app.hub;
    let routed = |call_id: &str, input: CallInput| {
        if !hub.to_call(call_id, input) {
            hub.refuse(sid, id, refusal(ErrorCode::NotFound, "no such call"));
        }
    };
    match env.msg {
        ClientMessage::Ping {} => hub.send(sid, id, ServerMessage::Pong),
        ClientMessage::JoinCall {
            call_id,
            device_id,
            key_package,
        } => {
            if claims.kind == TokenKind::Guest && claims.call.as_deref() != Some(call_id.as_str()) {
                hub.refuse(
                    sid,
                    id,
                    refusal(ErrorCode::Forbidden, "this invitation is for another call"),
                );
                return;
            }
            let info = match validate_key_package(&key_package.0) {
                Ok(info) => info,
                Err(e) => {
                    hub.refuse(
                        sid,
                        id,
                        refusal(ErrorCode::InvalidMls, format!("key package: {e}")),
                    );
                    return;
                }
            };
            let (limits, retention) =
                match join_limits(app, claims, &device_id, &info.identity_key).await {
                    Ok(l) => l,
                    Err(r) => {
                        hub.refuse(sid, id, r);
                        return;
                    }
                };
            let recorder = if retention {
                match recorder_seat(app, &call_id, &claims.sub).await {
                    Ok(seat) => seat.map(Box::new),
                    Err(r) => {
                        hub.refuse(sid, id, r);
                        return;
                    }
                }
            } else {
                None
            };
            let display_name = display_name(app, claims).await;
            hub.join(
                &call_id,
                CallInput::Join {
                    session: sid,
                    id,
                    user_id: claims.sub.clone(),
                    device_id,
                    display_name,
                    info,
                    key_package: key_package.0,
                    limits,
                    recorder,
                },
            );
        }
        ClientMessage::GroupCreated {
            call_id,
            group_info,
        } => routed(
            &call_id,
            CallInput::GroupCreated {
                session: sid,
                id,
                group_info: group_info.0,
            },
        ),
        ClientMessage::Commit {
            call_id,
            epoch,
            commit,
            welcome,
        } => routed(
            &call_id,
            CallInput::Commit {
                session: sid,
                id,
                epoch,
                commit: commit.0,
                welcome: welcome.map(|w| w.0),
            },
        ),
        ClientMessage::EpochAck { call_id, epoch } => {
            routed(
                &call_id,
                CallInput::Ack {
                    session: sid,
                    epoch,
                },
            );
        }
        ClientMessage::SetMute {
            call_id,
            audio,
            video,
        } => routed(
            &call_id,
            CallInput::Mute {
                session: sid,
                id,
                audio,
                video,
            },
        ),
        ClientMessage::MediaOffer {
            call_id,
            sdp,
            sources,
        } => {
            let policy = if claims.kind == TokenKind::Guest {
                crate::db::Policy::default()
            } else {
                match app.db.policy_of(&claims.sub).await {
                    Ok(p) => p,
                    Err(_) => {
                        hub.refuse(
                            sid,
                            id,
                            refusal(ErrorCode::Internal, "could not read your policy"),
                        );
                        return;
                    }
                }
            };
            let rights = PublishRights {
                audio: policy.may_publish_audio,
                camera: policy.may_publish_video,
                screen: policy.may_share_screen,
            };
            let sources = sources
                .into_iter()
                .map(|s| (s.mid, media_source(s.source)))
                .collect();
            hub.media_offer(sid, id, call_id, sdp, sources, rights)
                .await;
        }
        ClientMessage::UploadKeyPackages {
            device_id,
            key_packages,
        } => {
            let expected = match Principal::member(&claims.sub, &device_id) {
                Ok(p) => p,
                Err(_) => {
                    hub.refuse(sid, id, refusal(ErrorCode::BadRequest, "invalid device id"));
                    return;
                }
            };
            let mut encoded = Vec::with_capacity(key_packages.len());
            for (i, kp) in key_packages.iter().enumerate() {
                match validate_key_package(&kp.0) {
                    Ok(info) if info.principal == expected => {
                        use base64::Engine;
                        encoded.push(base64::engine::general_purpose::STANDARD.encode(&kp.0));
                    }
                    Ok(_) => {
                        hub.refuse(
                            sid,
                            id,
                            refusal(
                                ErrorCode::Forbidden,
                                format!("key package {i} names another user or device"),
                            ),
                        );
                        return;
                    }
                    Err(e) => {
                        hub.refuse(
                            sid,
                            id,
                            refusal(ErrorCode::InvalidMls, format!("key package {i}: {e}")),
                        );
                        return;
                    }
                }
            }
            match app
                .db
                .store_key_packages(&claims.sub, &device_id, &encoded)
                .await
            {
                Ok(stored) => {
                    hub.set_key_package_device(sid, &device_id);
                    hub.send(
                        sid,
                        id,
                        ServerMessage::KeyPackagesStored {
                            device_id,
                            stored: u32::try_from(stored).unwrap_or(u32::MAX),
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "storing key packages");
                    hub.refuse(
                        sid,
                        id,
                        refusal(ErrorCode::Internal, "could not store key packages"),
                    );
                }
            }
        }
        ClientMessage::SetQuality { call_id, max_layer } => {
            hub.set_quality(sid, id, &call_id, max_layer);
        }
        ClientMessage::Pin {
            call_id,
            user_id,
            device_id,
            source,
            pinned,
        } => hub.pin(
            sid,
            id,
            &call_id,
            (&user_id, &device_id),
            media_source(source),
            pinned,
        ),
        ClientMessage::LeaveCall { call_id } => routed(
            &call_id,
            CallInput::Leave {
                session: sid,
                id,
                reason: RemovalReason::Left,
            },
        ),
    }
}

fn media_source(s: MediaSource) -> Source {
    match s {
        MediaSource::Audio => Source::Audio,
        MediaSource::Camera => Source::Camera,
        MediaSource::Screen => Source::Screen,
    }
}

/// Finds the organisation's recorder for a call whose joiner's policy
/// requires records: none if it is already in the call, else its live
/// session and one of its stored key packages. Refuses (fails closed) when
/// no recorder is configured, online, or holding key packages.
async fn recorder_seat(
    app: &AppState,
    call_id: &str,
    joiner: &str,
) -> Result<Option<RecorderSeat>, Refusal> {
    let unavailable = |why: &str| {
        refusal(
            ErrorCode::Forbidden,
            format!("this call must be recorded for retention, but {why}"),
        )
    };
    let recorder = app
        .db
        .recorder(&app.org_id)
        .await
        .map_err(|_| refusal(ErrorCode::Internal, "could not read the retention settings"))?
        .ok_or_else(|| unavailable("no retention recorder is configured"))?;
    if recorder == joiner || app.hub.call_has_user(call_id, &recorder) {
        return Ok(None);
    }
    let (session, device_id) = app
        .hub
        .live_recorder(&recorder)
        .ok_or_else(|| unavailable("the retention recorder is offline"))?;
    let stored = app
        .db
        .take_key_package(&recorder, &device_id)
        .await
        .map_err(|_| refusal(ErrorCode::Internal, "could not read key packages"))?
        .ok_or_else(|| unavailable("the retention recorder has no key packages left"))?;
    use base64::Engine;
    let key_package = base64::engine::general_purpose::STANDARD
        .decode(stored.as_bytes())
        .map_err(|_| refusal(ErrorCode::Internal, "a stored key package is corrupt"))?;
    let info = validate_key_package(&key_package)
        .map_err(|_| unavailable("its stored key package is no longer valid"))?;
    let display_name = match app.db.user(&recorder).await {
        Ok(Some(u)) => u.display_name,
        _ => String::new(),
    };
    Ok(Some(RecorderSeat {
        session,
        display_name,
        user_id: recorder,
        device_id,
        info,
        key_package,
    }))
}

/// The name others see for this session's user: the account's display name,
/// or `Guest`. Empty if it cannot be read (clients then show the user id).
async fn display_name(app: &AppState, claims: &Claims) -> String {
    if claims.kind == TokenKind::Guest {
        return "Guest".into();
    }
    match app.db.user(&claims.sub).await {
        Ok(Some(u)) => u.display_name,
        _ => String::new(),
    }
}

/// What the joiner's security group allows, and whether it requires
/// records; refuses a joiner who may not join.
async fn join_limits(
    app: &AppState,
    claims: &Claims,
    device_id: &str,
    identity_key: &[u8],
) -> Result<(JoinLimits, bool), Refusal> {
    if claims.kind == TokenKind::Guest {
        // Guests never start calls; the invitation already names the call.
        return Ok((
            JoinLimits {
                max_size: crate::db::Policy::default().max_call_size,
                may_start: false,
            },
            false,
        ));
    }
    let policy = app
        .db
        .policy_of(&claims.sub)
        .await
        .map_err(|_| refusal(ErrorCode::Internal, "could not read your policy"))?;
    if !policy.may_join_calls {
        return Err(refusal(
            ErrorCode::Forbidden,
            "your security group may not join calls",
        ));
    }
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.encode(identity_key);
    match app.db.see_device(&claims.sub, device_id, &key).await {
        Ok(crate::db::DeviceKey::Changed) => {
            tracing::warn!(user = %claims.sub, device = %device_id, "device presented a new identity key");
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "recording device"),
    }
    Ok((
        JoinLimits {
            max_size: policy.max_call_size,
            may_start: policy.may_start_calls,
        },
        policy.retention_required,
    ))
}
