//! The relay's selective forwarding unit: a device publishes its video once, to a receiving peer
//! in the relay (the *upstream*, a [`Viewer`]); the relay forwards every RTP packet to each
//! viewer's own sending peer (a [`VideoSender`] per pilot or WHEP player).
//!
//! The SFU does no signaling transport of its own. Its owner (the relay) hands it the device's
//! messages for the upstream session ([`Sfu::from_device`]) and each viewer's offer and
//! candidates ([`Sfu::subscribe`], [`Sfu::viewer_candidate`]); what the SFU has to say goes out
//! on the [`SfuOut`] channel given at construction, for the owner to route.
//!
//! Per publication:
//! - **Forwarding**: read -> write. Each packet the upstream receives goes into every viewer's
//!   queue; each viewer's writer task writes it to that viewer's sender, which stamps its own
//!   SSRC and negotiated payload type. A viewer that is not connected yet drops it; one that
//!   falls [`VIEWER_QUEUE`] packets behind loses packets, not the others' time.
//! - **NACK**: every viewer's sender keeps the packets it sent (the webrtc crate's NACK responder
//!   interceptor) and answers that viewer's NACKs itself; the upstream peer NACKs the device for
//!   what the relay missed.
//! - **Keyframes**: a viewer's PLI/FIR, and every viewer's first `connected`, become one PLI to
//!   the device, at most every [`SfuSettings::keyframe_gap`]; requests inside the gap are
//!   remembered and sent when it ends, so a new viewer's picture starts within a second.
//! - **Bitrate**: once a second the lowest estimate among the viewers (REMB or transport-wide-cc)
//!   is sent upstream as REMB; the device's encoder follows it (and its own estimate of the
//!   device -> relay path).
//! - **Codec**: the upstream offers the device the codecs (of H.264 and VP8) that the viewer
//!   opening it can decode, and the device picks one; the relay does not transcode, so a later
//!   viewer that cannot decode that codec is refused ([`RtcError::StreamCodec`]).
//! - **Lifetime**: the upstream opens with the first viewer and closes
//!   [`SfuSettings::linger`] after the last one leaves. When it fails or the device ends it,
//!   every viewer is ended ([`SfuOut::ViewerEnded`], reason `publisher_left`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use ::rtc::rtp;
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::rtc::{Candidate, IceServer, PeerEvent, PeerSettings, Reachability, RtcError, VideoCodec, VideoSender};
use crate::viewer::{ConnectionState, H264_CB_MODE1, OfferedCodec, Viewer, ViewerOptions};

/// How the SFU's peers are built and how it paces its requests to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SfuSettings {
    /// STUN/TURN servers for the relay's own peers (usually none: the relay is the reachable
    /// party).
    pub ice_servers: Vec<IceServer>,
    /// Public addresses, UDP port range, ICE-TCP.
    pub reach: Reachability,
    /// Resolve viewers' `<uuid>.local` candidates (browsers on the relay's own LAN).
    pub mdns: bool,
    /// Also gather loopback candidates (tests on one machine).
    pub include_loopback: bool,
    /// Fewest time between two keyframe requests to a device (default 600 ms: the shipped agent
    /// ignores requests closer than 500 ms).
    pub keyframe_gap: Duration,
    /// How long a viewer's offer waits for the device to answer the upstream offer (default 10 s).
    pub upstream_timeout: Duration,
    /// How long the upstream stays open after its last viewer left (default 10 s), so a viewer
    /// that reconnects finds it still there.
    pub linger: Duration,
    /// The lowest bitrate the SFU ever asks a device for, bits/s (default 150 000): one viewer on
    /// a very poor link should degrade, not stop, everyone else's picture.
    pub min_bitrate_bps: u64,
    /// How long a non-trickle (WHEP) answer waits for the relay's candidates (default 2 s).
    pub gather_timeout: Duration,
}

impl Default for SfuSettings {
    fn default() -> Self {
        SfuSettings {
            ice_servers: Vec::new(),
            reach: Reachability::default(),
            mdns: true,
            include_loopback: false,
            keyframe_gap: Duration::from_millis(600),
            upstream_timeout: Duration::from_secs(10),
            linger: Duration::from_secs(10),
            min_bitrate_bps: 150_000,
            gather_timeout: Duration::from_secs(2),
        }
    }
}

/// A device's publication is keyed by its organisation and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    /// The device's organisation.
    pub org: String,
    /// The device's id.
    pub device: String,
}

impl DeviceKey {
    /// A key.
    pub fn new(org: &str, device: &str) -> DeviceKey {
        DeviceKey { org: org.to_owned(), device: device.to_owned() }
    }
}

/// What the SFU asks its owner to deliver.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SfuOut {
    /// A `webrtc` payload for the device (upstream session: offer, candidates, bye).
    ToDevice {
        /// The device.
        key: DeviceKey,
        /// The payload, with `subtype` and `sessionID`.
        payload: Value,
    },
    /// A `webrtc` payload for a viewer (its session's candidates).
    ToViewer {
        /// The device the viewer watches.
        key: DeviceKey,
        /// The viewer's session id.
        viewer: String,
        /// The payload, with `subtype` and `sessionID`.
        payload: Value,
    },
    /// The SFU ended a viewer on its own (the publisher went away): tell the viewer, forget the
    /// session.
    ViewerEnded {
        /// The device the viewer watched.
        key: DeviceKey,
        /// The viewer's session id.
        viewer: String,
        /// `publisher_left`.
        reason: String,
        /// A sentence for people.
        message: String,
    },
}

/// Why a viewer could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SfuError {
    /// The device did not answer the upstream offer in time, refused it, or the upstream failed.
    #[error("the device's stream to the relay could not be set up: {0}")]
    Upstream(String),
    /// The viewer's offer could not be answered (no video section, no common codec, ...).
    #[error(transparent)]
    Viewer(#[from] RtcError),
    /// No such viewer.
    #[error("no SFU session {0:?}")]
    UnknownViewer(String),
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SfuStats {
    /// Devices publishing (upstreams open).
    pub publications: usize,
    /// Viewers served.
    pub viewers: usize,
    /// RTP packets received from devices.
    pub packets_in: u64,
    /// RTP packets handed to viewers' senders.
    pub packets_out: u64,
    /// Packets a viewer lost because its queue was full (it fell behind).
    pub packets_dropped: u64,
    /// Keyframe requests sent to devices.
    pub keyframe_requests: u64,
}

/// What a subscription wants beyond the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Wait for the relay's candidates and put them into the answer (WHEP players do not
    /// trickle). Otherwise the answer (with `"mode":"sfu"`) and then the candidates go out as
    /// [`SfuOut::ToViewer`] messages, in that order; the answer is also returned.
    pub gather: bool,
}

/// The SFU. Share it behind an `Arc`.
pub struct Sfu {
    settings: SfuSettings,
    out: mpsc::UnboundedSender<SfuOut>,
    publications: Mutex<HashMap<DeviceKey, Arc<Publication>>>,
    /// Which publication each viewer belongs to.
    viewers: Mutex<HashMap<String, DeviceKey>>,
    /// Candidates of viewers whose sender is still being built.
    pending: Mutex<HashMap<String, Vec<Candidate>>>,
    packets_in: AtomicU64,
    packets_out: AtomicU64,
    packets_dropped: AtomicU64,
    keyframe_requests: AtomicU64,
}

impl std::fmt::Debug for Sfu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sfu").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// Where an upstream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Upstream {
    /// Offer sent, no answer yet.
    Waiting,
    /// Answered: the codec the device sends.
    Ready(VideoCodec),
    /// Refused or failed; the reason.
    Failed(String),
}

/// One device's upstream and its viewers.
struct Publication {
    key: DeviceKey,
    /// The upstream session's id (`sfu-<hex>`).
    session: String,
    upstream: Viewer,
    state: watch::Sender<Upstream>,
    subscribers: Mutex<HashMap<String, Arc<Subscriber>>>,
    /// Since when the publication has had no viewer.
    empty_since: Mutex<Option<Instant>>,
    keyframe_pending: AtomicBool,
    last_keyframe: Mutex<Option<Instant>>,
    closed: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Subscriber {
    sender: Arc<VideoSender>,
    /// Packets waiting for this viewer's writer task.
    queue: mpsc::Sender<rtp::Packet>,
    /// Latest bandwidth estimate of this viewer, bits/s; 0 = none.
    estimate: AtomicU64,
    /// The event task and the writer task; aborted when the viewer goes.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Subscriber {
    async fn close(&self) {
        self.sender.close().await;
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }
}

/// Packets queued per viewer (about two seconds of a 2 Mbit/s stream). A viewer whose sender
/// falls further behind loses packets (counted in [`SfuStats::packets_dropped`]) instead of
/// delaying anyone else; its NACKs and keyframe requests then repair its picture.
pub const VIEWER_QUEUE: usize = 512;

impl Sfu {
    /// A new SFU; what it has to say goes to `out`.
    pub fn new(settings: SfuSettings, out: mpsc::UnboundedSender<SfuOut>) -> Arc<Sfu> {
        Arc::new(Sfu {
            settings,
            out,
            publications: Mutex::new(HashMap::new()),
            viewers: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            packets_in: AtomicU64::new(0),
            packets_out: AtomicU64::new(0),
            packets_dropped: AtomicU64::new(0),
            keyframe_requests: AtomicU64::new(0),
        })
    }

    /// Counters.
    pub fn stats(&self) -> SfuStats {
        SfuStats {
            publications: self.publications.lock().len(),
            viewers: self.viewers.lock().len(),
            packets_in: self.packets_in.load(Ordering::Relaxed),
            packets_out: self.packets_out.load(Ordering::Relaxed),
            packets_dropped: self.packets_dropped.load(Ordering::Relaxed),
            keyframe_requests: self.keyframe_requests.load(Ordering::Relaxed),
        }
    }

    /// A viewer's offer for `key`'s video: opens the device's upstream if there is none (and
    /// waits for the device's answer), then answers the viewer from a new sending peer. An offer
    /// for a viewer already served renegotiates its peer (an ICE restart); if that fails (a new
    /// peer connection behind the same session), the old peer is replaced.
    pub async fn subscribe(
        self: &Arc<Self>,
        key: &DeviceKey,
        viewer: &str,
        offer_sdp: &str,
        options: SubscribeOptions,
    ) -> Result<String, SfuError> {
        // Refused before any upstream is opened for it.
        crate::rtc::check_viewer_offer(offer_sdp)?;
        let existing = self.publications.lock().get(key).and_then(|p| p.subscribers.lock().get(viewer).cloned());
        if let Some(sub) = existing {
            match sub.sender.renegotiate(offer_sdp).await {
                Ok(answer) => {
                    tracing::info!(%viewer, device = %key.device, "SFU viewer renegotiated");
                    if !options.gather {
                        self.send_answer(key, viewer, &answer);
                    }
                    return Ok(answer);
                }
                Err(e) => {
                    tracing::info!(%viewer, "SFU viewer's new offer is a new peer ({e}); replacing it");
                    self.unsubscribe(viewer).await;
                }
            }
        }
        self.pending.lock().entry(viewer.to_owned()).or_default();
        let result = self.subscribe_new(key, viewer, offer_sdp, options).await;
        if result.is_err() {
            self.pending.lock().remove(viewer);
        }
        result
    }

    async fn subscribe_new(
        self: &Arc<Self>,
        key: &DeviceKey,
        viewer: &str,
        offer_sdp: &str,
        options: SubscribeOptions,
    ) -> Result<String, SfuError> {
        // What this viewer can take of what a device sends: a new upstream offers only that, so
        // the device answers in a codec this viewer decodes (Firefox without OpenH264: VP8).
        // An offer with neither codec is refused here, naming what it had.
        crate::rtc::choose_codec(offer_sdp, &VideoCodec::ALL)?;
        let sendable = crate::rtc::sendable_codecs(offer_sdp)?;
        let publication = self.publication(key, &sendable).await?;
        let codec = self.wait_ready(&publication).await?;
        if !sendable.contains(&codec) {
            // The upstream was opened for a viewer with another codec; no transcoding.
            let offered = match crate::rtc::choose_codec(offer_sdp, &[codec]) {
                Err(RtcError::NoCommonCodec { offered, .. }) => offered,
                _ => "nothing usable".to_owned(),
            };
            tracing::info!(%viewer, device = %key.device, ?codec, %offered, "SFU viewer refused: it cannot decode the stream's codec");
            return Err(SfuError::Viewer(RtcError::StreamCodec { stream: codec.mime_type().to_owned(), offered }));
        }

        let settings = PeerSettings {
            ice_servers: self.settings.ice_servers.clone(),
            codec,
            mdns: self.settings.mdns,
            include_loopback: self.settings.include_loopback,
            reach: self.settings.reach.clone(),
        };
        let (etx, erx) = mpsc::channel(256);
        let (sender, mut answer) = VideoSender::answer(&settings, offer_sdp, etx).await?;
        let sender = Arc::new(sender);
        let (queue, queued) = mpsc::channel(VIEWER_QUEUE);
        let sub = Arc::new(Subscriber {
            sender: sender.clone(),
            queue,
            estimate: AtomicU64::new(0),
            tasks: Mutex::new(vec![tokio::spawn(write_to_viewer(self.clone(), sender.clone(), queued))]),
        });
        let (gathered_tx, gathered_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        let task = tokio::spawn(viewer_events(
            self.clone(),
            publication.clone(),
            viewer.to_owned(),
            erx,
            options.gather.then_some(gathered_tx),
            release_rx,
        ));
        sub.tasks.lock().push(task);
        if publication.closed.load(Ordering::Acquire) {
            sender.close().await;
            return Err(SfuError::Upstream("the device's stream ended".to_owned()));
        }
        publication.subscribers.lock().insert(viewer.to_owned(), sub);
        *publication.empty_since.lock() = None;
        self.viewers.lock().insert(viewer.to_owned(), key.clone());
        let early = self.pending.lock().remove(viewer).unwrap_or_default();
        for c in early {
            if let Err(e) = sender.add_remote_candidate(c).await {
                tracing::debug!(%viewer, "early candidate refused: {e}");
            }
        }
        tracing::info!(%viewer, device = %key.device, negotiated = ?sender.negotiated(), "SFU viewer added");
        if !options.gather {
            // The answer goes out before any of the relay's candidates (they wait for this).
            self.send_answer(key, viewer, &answer);
        }
        let _ = release_tx.send(());
        if options.gather {
            let candidates = match tokio::time::timeout(self.settings.gather_timeout, gathered_rx).await {
                Ok(Ok(c)) => c,
                _ => {
                    tracing::debug!(%viewer, "gathering did not complete in time; answering with what there is");
                    Vec::new()
                }
            };
            answer = with_candidates(&answer, &candidates);
        }
        Ok(answer)
    }

    /// Sends a trickling viewer its answer (`"mode":"sfu"`), through the same channel as the
    /// candidates that follow it.
    fn send_answer(&self, key: &DeviceKey, viewer: &str, answer: &str) {
        let _ = self.out.send(SfuOut::ToViewer {
            key: key.clone(),
            viewer: viewer.to_owned(),
            payload: json!({"subtype": "answer", "sessionID": viewer, "sdp": answer, "mode": "sfu"}),
        });
    }

    /// The device's publication, opening its upstream if there is none; a new upstream offers
    /// `codecs` (those the viewer opening it can decode), and the device picks among them.
    async fn publication(
        self: &Arc<Self>,
        key: &DeviceKey,
        codecs: &[VideoCodec],
    ) -> Result<Arc<Publication>, SfuError> {
        if let Some(p) = self.publications.lock().get(key).filter(|p| !p.closed.load(Ordering::Acquire)) {
            return Ok(p.clone());
        }
        let options = ViewerOptions {
            codecs: codecs
                .iter()
                .map(|c| match c {
                    VideoCodec::H264 => OfferedCodec::new("video/H264", H264_CB_MODE1, 102),
                    VideoCodec::Vp8 => OfferedCodec::new("video/VP8", "", 96),
                })
                .collect(),
            mdns: None,
            include_loopback: self.settings.include_loopback,
            udp_addrs: Vec::new(),
            ice_servers: self.settings.ice_servers.clone(),
            reach: self.settings.reach.clone(),
        };
        let new = Viewer::offer(&options).await.map_err(|e| SfuError::Upstream(e.to_string()))?;
        let session = format!("sfu-{:016x}", rand::random::<u64>());
        let (state, _) = watch::channel(Upstream::Waiting);
        let publication = Arc::new(Publication {
            key: key.clone(),
            session: session.clone(),
            upstream: new.viewer,
            state,
            subscribers: Mutex::new(HashMap::new()),
            empty_since: Mutex::new(None),
            keyframe_pending: AtomicBool::new(false),
            last_keyframe: Mutex::new(None),
            closed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        // Two viewers may race to open the same device's upstream: the first one in wins.
        let raced = {
            let mut map = self.publications.lock();
            match map.get(key).filter(|p| !p.closed.load(Ordering::Acquire)) {
                Some(p) => Some(p.clone()),
                None => {
                    map.insert(key.clone(), publication.clone());
                    None
                }
            }
        };
        if let Some(p) = raced {
            publication.upstream.close().await;
            return Ok(p);
        }
        tracing::info!(device = %key.device, %session, "SFU: opening the device's upstream");
        let tasks = vec![
            tokio::spawn(upstream_candidates(self.clone(), publication.clone(), new.candidates)),
            tokio::spawn(forward(self.clone(), publication.clone(), new.packets)),
            tokio::spawn(housekeeping(self.clone(), publication.clone())),
        ];
        publication.tasks.lock().extend(tasks);
        let _ = self.out.send(SfuOut::ToDevice {
            key: key.clone(),
            payload: json!({"subtype": "offer", "sessionID": session, "sdp": new.offer}),
        });
        Ok(publication)
    }

    async fn wait_ready(&self, publication: &Arc<Publication>) -> Result<VideoCodec, SfuError> {
        let mut state = publication.state.subscribe();
        let waited =
            tokio::time::timeout(self.settings.upstream_timeout, state.wait_for(|s| !matches!(s, Upstream::Waiting)))
                .await
                .map(|r| r.map(|s| s.clone()));
        let outcome = match waited {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => Upstream::Failed("the device's stream ended".to_owned()),
            Err(_) => Upstream::Failed(format!(
                "the device did not answer the relay's offer within {} s (is video enabled on it?)",
                self.settings.upstream_timeout.as_secs()
            )),
        };
        let why = match outcome {
            Upstream::Ready(codec) => return Ok(codec),
            Upstream::Failed(why) => why,
            // `wait_for` returns only a state other than Waiting.
            Upstream::Waiting => "the device's stream never started".to_owned(),
        };
        if publication.subscribers.lock().is_empty() {
            self.close_publication(publication, Some("sfu_failed"), "").await;
        }
        Err(SfuError::Upstream(why))
    }

    /// A candidate the viewer trickled (an empty one, end of candidates, is ignored). Candidates
    /// that arrive while the viewer's peer is being built are kept and applied once it exists.
    pub async fn viewer_candidate(&self, viewer: &str, candidate: Candidate) -> Result<(), SfuError> {
        if candidate.candidate.trim().is_empty() {
            return Ok(());
        }
        let sender = {
            let mut pending = self.pending.lock();
            if let Some(list) = pending.get_mut(viewer) {
                list.push(candidate);
                return Ok(());
            }
            drop(pending);
            self.sender_of(viewer)
        };
        let sender = sender.ok_or_else(|| SfuError::UnknownViewer(viewer.to_owned()))?;
        sender.add_remote_candidate(candidate).await.map_err(SfuError::from)
    }

    fn sender_of(&self, viewer: &str) -> Option<Arc<VideoSender>> {
        let key = self.viewers.lock().get(viewer).cloned()?;
        let publication = self.publications.lock().get(&key).cloned()?;
        publication.subscribers.lock().get(viewer).map(|s| s.sender.clone())
    }

    /// A viewer left (bye, its connection closed, WHEP DELETE). Unknown viewers are ignored.
    pub async fn unsubscribe(&self, viewer: &str) {
        self.pending.lock().remove(viewer);
        let Some(key) = self.viewers.lock().remove(viewer) else { return };
        let Some(publication) = self.publications.lock().get(&key).cloned() else { return };
        let sub = {
            let mut subs = publication.subscribers.lock();
            let sub = subs.remove(viewer);
            if subs.is_empty() {
                *publication.empty_since.lock() = Some(Instant::now());
            }
            sub
        };
        if let Some(sub) = sub {
            sub.close().await;
            tracing::info!(%viewer, device = %key.device, "SFU viewer left");
        }
    }

    /// A `webrtc` message from a device. Returns false if it is not for an upstream session of
    /// this SFU (the owner routes it elsewhere).
    pub async fn from_device(
        &self,
        key: &DeviceKey,
        session: &str,
        subtype: &str,
        payload: &Map<String, Value>,
    ) -> bool {
        let Some(publication) = self.publications.lock().get(key).filter(|p| p.session == session).cloned() else {
            return false;
        };
        match subtype {
            "answer" => {
                let Some(sdp) = payload.get("sdp").and_then(Value::as_str) else {
                    publication.state.send_replace(Upstream::Failed("the device's answer has no sdp".to_owned()));
                    return true;
                };
                let codec = answered_codec(sdp);
                match publication.upstream.apply_answer(sdp).await {
                    Ok(()) => {
                        tracing::info!(device = %key.device, ?codec, "SFU: the device answered the upstream offer");
                        publication.state.send_replace(Upstream::Ready(codec));
                    }
                    Err(e) => {
                        tracing::warn!(device = %key.device, "SFU: the device's answer is unusable: {e}");
                        publication
                            .state
                            .send_replace(Upstream::Failed(format!("the device's answer is unusable: {e}")));
                    }
                }
            }
            "ice_candidate" => match serde_json::from_value::<Candidate>(Value::Object(payload.clone())) {
                Ok(c) if !c.candidate.trim().is_empty() => {
                    if let Err(e) = publication.upstream.add_remote_candidate(c).await {
                        tracing::debug!(device = %key.device, "SFU: device candidate refused: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(device = %key.device, "SFU: unreadable device candidate: {e}"),
            },
            "bye" => {
                let reason = payload.get("reason").and_then(Value::as_str).unwrap_or("bye");
                let message = payload.get("message").and_then(Value::as_str).unwrap_or_default();
                tracing::info!(device = %key.device, %reason, %message, "SFU: the device ended its upstream");
                let why = if message.is_empty() { reason.to_owned() } else { format!("{reason}: {message}") };
                publication.state.send_replace(Upstream::Failed(format!("the device ended the stream ({why})")));
                self.close_publication(&publication, None, &format!("the device ended its stream ({why})")).await;
            }
            "state" => {
                tracing::debug!(device = %key.device, state = ?payload.get("state"), "SFU: device peer state");
            }
            other => tracing::debug!(device = %key.device, "SFU: ignoring webrtc {other:?} on the upstream"),
        }
        true
    }

    /// The device disconnected: its upstream and every viewer's peer are closed without a word
    /// (the owner tells the viewers `device_offline`).
    pub async fn device_gone(&self, key: &DeviceKey) {
        let publication = self.publications.lock().get(key).cloned();
        if let Some(p) = publication {
            p.state.send_replace(Upstream::Failed("the device disconnected".to_owned()));
            self.close_publication(&p, None, "").await;
        }
    }

    /// Closes a publication: tells the device (`bye_reason`) if given, ends every viewer (with
    /// [`SfuOut::ViewerEnded`] unless `viewer_message` is empty), closes the peers.
    async fn close_publication(&self, p: &Arc<Publication>, bye_reason: Option<&str>, viewer_message: &str) {
        if p.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut map = self.publications.lock();
            if map.get(&p.key).is_some_and(|q| Arc::ptr_eq(q, p)) {
                map.remove(&p.key);
            }
        }
        if let Some(reason) = bye_reason {
            let _ = self.out.send(SfuOut::ToDevice {
                key: p.key.clone(),
                payload: json!({"subtype": "bye", "sessionID": p.session, "reason": reason}),
            });
        }
        let subs: Vec<(String, Arc<Subscriber>)> = p.subscribers.lock().drain().collect();
        for (viewer, sub) in subs {
            self.viewers.lock().remove(&viewer);
            if !viewer_message.is_empty() {
                let _ = self.out.send(SfuOut::ViewerEnded {
                    key: p.key.clone(),
                    viewer: viewer.clone(),
                    reason: "publisher_left".to_owned(),
                    message: viewer_message.to_owned(),
                });
            }
            sub.close().await;
        }
        p.upstream.close().await;
        for task in p.tasks.lock().drain(..) {
            task.abort();
        }
        tracing::info!(device = %p.key.device, session = %p.session, "SFU: upstream closed");
    }
}

impl Publication {
    /// Asks for a keyframe; sent by the housekeeping loop within the keyframe gap.
    fn request_keyframe(&self) {
        self.keyframe_pending.store(true, Ordering::Release);
    }
}

/// The codec of an answer's first video payload type.
fn answered_codec(sdp: &str) -> VideoCodec {
    let mut in_video = false;
    for line in sdp.lines() {
        let line = line.trim();
        if let Some(m) = line.strip_prefix("m=") {
            in_video = m.starts_with("video");
            continue;
        }
        if in_video && let Some(map) = line.strip_prefix("a=rtpmap:") {
            let name = map.split_whitespace().nth(1).unwrap_or_default();
            if name.to_ascii_uppercase().starts_with("VP8/") {
                return VideoCodec::Vp8;
            }
            if name.to_ascii_uppercase().starts_with("H264/") {
                return VideoCodec::H264;
            }
        }
    }
    VideoCodec::H264
}

/// `sdp` with `a=candidate` lines and `a=end-of-candidates` added to its first media section
/// (the bundled transport every section shares).
pub fn with_candidates(sdp: &str, candidates: &[Candidate]) -> String {
    let mut out = String::with_capacity(sdp.len() + candidates.len() * 96);
    let mut media_sections = 0;
    let mut inserted = false;
    let insert = |out: &mut String| {
        for c in candidates {
            let line = c.candidate.strip_prefix("a=").unwrap_or(&c.candidate);
            out.push_str("a=");
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str("a=end-of-candidates\r\n");
    };
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") {
            media_sections += 1;
            if media_sections == 2 && !inserted {
                insert(&mut out);
                inserted = true;
            }
        }
        out.push_str(line);
    }
    if !inserted && media_sections > 0 {
        if !out.ends_with('\n') {
            out.push_str("\r\n");
        }
        insert(&mut out);
    }
    out
}

/// Trickles the upstream peer's candidates to the device.
async fn upstream_candidates(
    sfu: Arc<Sfu>,
    p: Arc<Publication>,
    mut candidates: mpsc::UnboundedReceiver<Option<Candidate>>,
) {
    while let Some(c) = candidates.recv().await {
        let mut payload = match &c {
            Some(c) => serde_json::to_value(c).unwrap_or_default(),
            None => json!({"candidate": ""}),
        };
        payload["subtype"] = json!("ice_candidate");
        payload["sessionID"] = json!(p.session);
        let _ = sfu.out.send(SfuOut::ToDevice { key: p.key.clone(), payload });
    }
}

/// Read -> write: every packet from the device to every viewer.
/// Read -> write: every packet from the device into every viewer's queue. Each viewer's own
/// writer task takes it from there, so viewers are written to in parallel and a slow one
/// delays no one.
async fn forward(sfu: Arc<Sfu>, p: Arc<Publication>, mut packets: mpsc::Receiver<rtp::Packet>) {
    let mut queues: Vec<mpsc::Sender<rtp::Packet>> = Vec::new();
    while let Some(packet) = packets.recv().await {
        sfu.packets_in.fetch_add(1, Ordering::Relaxed);
        queues.clear();
        queues.extend(p.subscribers.lock().values().map(|s| s.queue.clone()));
        for queue in &queues {
            if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(packet.clone()) {
                sfu.packets_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tracing::debug!(device = %p.key.device, "SFU: upstream packet stream ended");
}

/// One viewer's writer: its queued packets into its sender.
async fn write_to_viewer(sfu: Arc<Sfu>, sender: Arc<VideoSender>, mut queued: mpsc::Receiver<rtp::Packet>) {
    while let Some(packet) = queued.recv().await {
        // A viewer that is not connected yet drops the packet (Ok); a closed one ends here.
        match sender.write_packet(packet).await {
            Ok(()) => {
                sfu.packets_out.fetch_add(1, Ordering::Relaxed);
            }
            Err(RtcError::Closed) => return,
            Err(e) => tracing::debug!("SFU: write to a viewer failed: {e}"),
        }
    }
}

/// Keyframe pacing, bitrate feedback, the upstream's health and the linger after the last
/// viewer.
async fn housekeeping(sfu: Arc<Sfu>, p: Arc<Publication>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = p.upstream.state();
    let mut last_remb = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let s = *state.borrow();
                match s {
                    ConnectionState::Connected => {
                        tracing::info!(device = %p.key.device, "SFU: upstream connected");
                    }
                    ConnectionState::Failed | ConnectionState::Closed => {
                        if p.closed.load(Ordering::Acquire) {
                            return;
                        }
                        tracing::warn!(device = %p.key.device, state = %s, "SFU: upstream lost");
                        p.state.send_replace(Upstream::Failed(format!("the connection from the device is {s}")));
                        let sfu2 = sfu.clone();
                        let p2 = p.clone();
                        // Closing aborts this task: do it from another one.
                        tokio::spawn(async move {
                            let msg = format!("the device's stream to the relay was lost (connection {s})");
                            sfu2.close_publication(&p2, Some("sfu_failed"), &msg).await;
                        });
                        return;
                    }
                    _ => {}
                }
                continue;
            }
        }
        if p.closed.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        if p.keyframe_pending.load(Ordering::Acquire) && p.upstream.ssrc().is_some() {
            let due = p.last_keyframe.lock().is_none_or(|t| now.duration_since(t) >= sfu.settings.keyframe_gap);
            if due {
                p.keyframe_pending.store(false, Ordering::Release);
                *p.last_keyframe.lock() = Some(now);
                sfu.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = p.upstream.request_keyframe().await {
                    tracing::debug!(device = %p.key.device, "SFU: keyframe request failed: {e}");
                }
            }
        }
        if now.duration_since(last_remb) >= Duration::from_secs(1) {
            last_remb = now;
            let lowest =
                p.subscribers.lock().values().map(|s| s.estimate.load(Ordering::Relaxed)).filter(|b| *b > 0).min();
            if let (Some(bps), Some(ssrc)) = (lowest, p.upstream.ssrc()) {
                let bitrate = bps.max(sfu.settings.min_bitrate_bps) as f32;
                let remb = ReceiverEstimatedMaximumBitrate { sender_ssrc: 0, bitrate, ssrcs: vec![ssrc] };
                if let Err(e) = p.upstream.write_rtcp(vec![Box::new(remb)]).await {
                    tracing::debug!(device = %p.key.device, "SFU: REMB failed: {e}");
                }
            }
        }
        let linger_over = p.empty_since.lock().is_some_and(|t| now.duration_since(t) >= sfu.settings.linger);
        if linger_over && p.subscribers.lock().is_empty() {
            tracing::info!(device = %p.key.device, "SFU: no viewers for {:?}; closing the upstream", sfu.settings.linger);
            let sfu2 = sfu.clone();
            let p2 = p.clone();
            tokio::spawn(async move { sfu2.close_publication(&p2, Some("no_viewers"), "").await });
            return;
        }
    }
}

/// One viewer's sender events: candidates out (or collected for a non-trickle answer),
/// keyframe requests and estimates folded into the publication.
async fn viewer_events(
    sfu: Arc<Sfu>,
    p: Arc<Publication>,
    viewer: String,
    mut events: mpsc::Receiver<PeerEvent>,
    mut gathered: Option<oneshot::Sender<Vec<Candidate>>>,
    release: oneshot::Receiver<()>,
) {
    // Nothing goes out before the answer has (a dropped sender means the subscription failed;
    // the events are then drained to nowhere until the peer closes).
    let _ = release.await;
    let mut collected = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            PeerEvent::LocalCandidate(c) => {
                if gathered.is_some() {
                    match c {
                        Some(c) => collected.push(c),
                        None => {
                            if let Some(tx) = gathered.take() {
                                let _ = tx.send(std::mem::take(&mut collected));
                            }
                        }
                    }
                    continue;
                }
                let mut payload = match &c {
                    Some(c) => serde_json::to_value(c).unwrap_or_default(),
                    None => json!({"candidate": ""}),
                };
                payload["subtype"] = json!("ice_candidate");
                payload["sessionID"] = json!(viewer);
                let _ = sfu.out.send(SfuOut::ToViewer { key: p.key.clone(), viewer: viewer.clone(), payload });
            }
            PeerEvent::State(state) => {
                tracing::info!(%viewer, device = %p.key.device, %state, "SFU viewer peer state");
                if state == "connected" {
                    p.request_keyframe();
                }
            }
            PeerEvent::KeyframeRequested => p.request_keyframe(),
            PeerEvent::Bandwidth { bps } => {
                if let Some(sub) = p.subscribers.lock().get(&viewer) {
                    sub.estimate.store(bps, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_go_into_the_first_media_section() {
        let sdp =
            "v=0\r\ns=-\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\n";
        let c =
            Candidate { candidate: "candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host".into(), ..Default::default() };
        let out = with_candidates(sdp, &[c]);
        assert_eq!(
            out,
            "v=0\r\ns=-\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n\
             a=candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host\r\na=end-of-candidates\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\n"
        );
        let single = with_candidates("v=0\r\nm=video 9 X 96\r\na=mid:0\r\n", &[]);
        assert_eq!(single, "v=0\r\nm=video 9 X 96\r\na=mid:0\r\na=end-of-candidates\r\n");
    }

    #[test]
    fn answered_codec_reads_the_video_sections_first_rtpmap() {
        assert_eq!(answered_codec("v=0\r\nm=video 9 X 96\r\na=rtpmap:96 VP8/90000\r\n"), VideoCodec::Vp8);
        assert_eq!(
            answered_codec(
                "m=audio 9 X 111\r\na=rtpmap:111 opus/48000/2\r\nm=video 9 X 102\r\na=rtpmap:102 H264/90000\r\n"
            ),
            VideoCodec::H264
        );
    }
}
