//! The chunk server every mount with `--listen` runs, and the warm-up
//! service is. It serves only chunks of files its own source lists at the
//! version asked for, so a request can neither read outside the cache nor
//! make the node cache anything but the source's current files.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::Request;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::holders::Holders;
use super::{chunk_key, Membership, CRC_HEADER, HOLDERS_HEADER, NODE_HEADER, REDIRECT_HEADER};
use crate::stats::add;
use crate::{Engine, Error, FileVersion};

struct Server {
    engine: Arc<Engine>,
    token: String,
    node: String,
    redirects: Option<Redirects>,
    /// Chunk bodies being sent now.
    uploads: Arc<AtomicUsize>,
    /// Bounds them, on a member's server.
    slots: Option<Arc<Semaphore>>,
    holders: Arc<Holders>,
}

/// A group member's server: past `upload_limit` chunks being sent at once,
/// it names members that hold a chunk instead of sending it (see the
/// module `peer`).
pub struct Redirects {
    pub membership: Arc<Membership>,
    pub upload_limit: usize,
    /// The group's `--peer-timeout` and origin budget: how long askers wait
    /// for a first byte, which a request's wait for an upload slot must
    /// stay within.
    pub peer_timeout: Duration,
    pub origin_budget: Duration,
}

/// Chunks whose holders a server remembers: 64 Ki chunks of 8 MiB are 512
/// GiB of models, in a few MiB of memory.
const HOLDERS_REMEMBERED: usize = 1 << 16;

/// How long a write to an asker may make no progress (see `serve`): the
/// warm-up service's; a group member's is its `--peer-timeout`. Either is
/// raised to what an asker allows a chunk's body (at `MIN_PEER_RATE`).
const WRITE_STALL: Duration = Duration::from_secs(30);
const MIN_WRITE_STALL: Duration = Duration::from_secs(1);

/// A chunk body goes out in pieces this big, so that the upload counts as
/// in flight until nearly all of it is written (hyper asks for the next
/// piece only when its buffer has room).
const PIECE: usize = 256 << 10;

/// Kept of the asker's first-byte timeout when a request waits for an
/// upload slot: for the answer to travel and start.
const SLOT_MARGIN: Duration = Duration::from_secs(1);
/// The longest any request waits for an upload slot, whatever the askers'
/// budget: each waiting request holds a connection of the port's limit.
const SLOT_WAIT_MAX: Duration = Duration::from_secs(30);

/// The address the request came from, put in by the accept loop.
#[derive(Clone, Copy)]
struct From(SocketAddr);

#[derive(Deserialize)]
struct ChunkQuery {
    object: String,
    version: String,
    size: u64,
    chunk_size: u64,
    index: u64,
    #[serde(default)]
    cached_only: u8,
}

/// Connections served at once: a sixteenth of the daemon's descriptors,
/// between 64 and 8192, so idle or hostile connections never starve the
/// mount's own reads of fds. More wait in the kernel's listen backlog (no
/// descriptor of ours) until one closes: refusing them would send a fleet's
/// instances to the origin instead of the warm-up service.
fn max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a struct we own.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    (soft / 16).clamp(64, 8192)
}
/// Time for a request's headers, counted from when the server starts
/// waiting for them: on a new connection and between keep-alive requests
/// alike, so it also closes idle connections. Peers' pools drop idle
/// connections sooner (see the client), so they rarely meet a closed one.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the peer protocol on `listener` until the runtime stops.
pub async fn serve(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    token: String,
    node: String,
    tls: Option<super::TlsAcceptor>,
    redirects: Option<Redirects>,
) -> std::io::Result<()> {
    // Never sooner than an asker gives up on its own: its body may take a
    // chunk at the least rate it accepts.
    let body = Duration::from_secs_f64(
        engine.config().chunk_size as f64 / super::client::MIN_PEER_RATE as f64,
    );
    let stall = redirects
        .as_ref()
        .map_or(WRITE_STALL, |r| r.peer_timeout)
        .max(body)
        .max(MIN_WRITE_STALL);
    let state = Arc::new(Server {
        engine,
        token,
        node,
        slots: redirects
            .as_ref()
            .map(|r| Arc::new(Semaphore::new(r.upload_limit.max(1)))),
        redirects,
        uploads: Arc::default(),
        holders: Arc::new(Holders::new(HOLDERS_REMEMBERED)),
    });
    let app = Router::new()
        .route("/v1/chunk", get(chunk))
        .route("/v1/health", get(health))
        // The token before anything else, query parsing and unknown paths
        // included.
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    let slots = Arc::new(Semaphore::new(max_connections()));
    // An asker that stops reading an upload would hold its connection, its
    // slot and the chunk's copy for ever: a write that makes no progress
    // for this long ends the connection (an asker waits no longer itself).
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                warn!("peer port: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(stall));
        let stream = Box::pin(stream);
        let svc = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(From(from))),
        );
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, svc, from).await,
                // The handshake gets the header timeout too: a client that
                // connects and says nothing gives its slot back as soon.
                Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(s)) => serve_connection(s, svc, from).await,
                    Ok(Err(e)) => debug!(%from, "peer TLS handshake: {e}"),
                    Err(_) => debug!(%from, "peer TLS handshake timed out"),
                },
            }
            drop(slot);
        });
    }
}

async fn serve_connection<I>(
    io: I,
    svc: hyper_util::service::TowerToHyperService<Router>,
    from: std::net::SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        debug!(%from, "peer connection: {e}");
    }
}

async fn require_token(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    if !authorized(req.headers(), &s.token) {
        return unauthorized();
    }
    next.run(req).await
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.as_bytes().ct_eq(token.as_bytes()).into())
}

fn refuse(code: StatusCode, why: &str) -> Response {
    (code, format!("{why}\n")).into_response()
}

/// Closes the connection too: a client without the token gets one small
/// reply, not a keep-alive slot to pipeline requests into.
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::CONNECTION, "close")],
        "missing or wrong group token\n",
    )
        .into_response()
}

async fn health(State(s): State<Arc<Server>>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &s.token) {
        return unauthorized();
    }
    "ok\n".into_response()
}

async fn chunk(
    State(s): State<Arc<Server>>,
    Extension(From(from)): Extension<From>,
    headers: HeaderMap,
    q: Result<Query<ChunkQuery>, QueryRejection>,
) -> Response {
    // The asker's first-byte clock runs from before this: the listing
    // lookup below may take a while too.
    let started = Instant::now();
    if !authorized(&headers, &s.token) {
        return unauthorized();
    }
    // From this very node: answering would join the asker's own flight and
    // both would wait until the timeout. Refused before any work, with the id
    // so the asker knows the address is its own.
    if headers.get(NODE_HEADER).and_then(|v| v.to_str().ok()) == Some(s.node.as_str()) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            [(NODE_HEADER, s.node.clone())],
            "this request came from this node itself; that peer address is its own\n",
        )
            .into_response();
    }
    let Ok(Query(q)) = q else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "want object, version, size, chunk_size, index",
        );
    };
    let engine = &s.engine;
    if q.chunk_size != engine.config().chunk_size {
        return refuse(StatusCode::CONFLICT, "chunk size differs from this node's");
    }
    let root = format!("{}/", engine.source().id().trim_end_matches('/'));
    let Some(path) = q.object.strip_prefix(&root) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "object is not under this node's source",
        );
    };
    if path.is_empty()
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return refuse(StatusCode::BAD_REQUEST, "bad object path");
    }
    match engine.namespace().lookup(path).await {
        Ok(m) if !m.is_dir && m.version == q.version && m.size == q.size => {}
        _ => return refuse(StatusCode::NOT_FOUND, "no such object at that version"),
    }
    let file = FileVersion {
        path: path.to_string(),
        version: q.version,
        size: q.size,
    };
    let id = xxhash_rust::xxh3::xxh3_128(chunk_key(&q.object, &file.version, q.index).as_bytes());
    let asker = s
        .redirects
        .as_ref()
        .and_then(|r| member_at(&r.membership, from));
    // Only a member's server names holders, and only to askers that follow
    // such an answer, for requests that may fetch.
    let may = s.redirects.is_some()
        && q.cached_only != 1
        && headers.get(REDIRECT_HEADER).is_some_and(|v| v == "1");
    let limit = s.redirects.as_ref().map_or(usize::MAX, |r| r.upload_limit);
    if may && s.uploads.load(SeqCst) >= limit {
        if let Some(r) = redirect(&s, id, asker) {
            return r;
        }
    }
    let served = if q.cached_only == 1 {
        engine.cached_chunk(&file, q.index)
    } else {
        engine.serve_chunk(&file, q.index).await
    };
    match served {
        Ok(b) => {
            let slot = match upload_slot(&s, q.cached_only == 1, started).await {
                Slot::Go(p) => p,
                Slot::Waited(p) => match may.then(|| redirect(&s, id, asker)).flatten() {
                    Some(r) => return r,
                    None => p,
                },
            };
            add(&engine.stats().chunks_served_to_peers, 1);
            let crc = format!("{:08x}", crc32c::crc32c(&b));
            let upload = Upload::start(&s, asker.map(|a| (id, a)), slot, b.len());
            (StatusCode::OK, [(CRC_HEADER, crc)], upload.body(b)).into_response()
        }
        Err(Error::NotFound(_)) => refuse(StatusCode::NOT_FOUND, "not cached here"),
        Err(e) => {
            debug!("peer request for {} chunk {}: {e}", file.path, q.index);
            refuse(StatusCode::BAD_GATEWAY, &e.to_string())
        }
    }
}

/// 429 naming holders of chunk `id` other than `asker`, if any are known.
fn redirect(s: &Server, id: u128, asker: Option<SocketAddr>) -> Option<Response> {
    let holders = s.holders.get(id, asker);
    if holders.is_empty() {
        return None;
    }
    add(&s.engine.stats().redirects_sent, 1);
    let list: Vec<String> = holders.iter().map(|a| a.to_string()).collect();
    Some(
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(HOLDERS_HEADER, list.join(","))],
            "busy: ask these holders first\n",
        )
            .into_response(),
    )
}

enum Slot {
    /// Free at once (or no limit: not a member's server).
    Go(Option<OwnedSemaphorePermit>),
    /// Had to wait (meanwhile the chunk may have gained holders), and got a
    /// slot, or waited its bound and goes without one.
    Waited(Option<OwnedSemaphorePermit>),
}

/// A member's server sends at most `--peer-upload-limit` chunks at once
/// (one at least): more at once would each go slower than peers accept
/// (1 MiB/s) on a busy uplink, and send their askers to the origin. The rest
/// wait their turn, but no longer than the asker waits for a first byte
/// (`--peer-timeout`, plus the origin's budget for a request that may fetch,
/// less what the fetch took): then they are sent anyway. A longer wait would
/// time the asker out, and a "busy" answer would send it to the origin;
/// both cost the origin a chunk the group has.
async fn upload_slot(s: &Server, cached_only: bool, started: Instant) -> Slot {
    let (Some(slots), Some(r)) = (&s.slots, &s.redirects) else {
        return Slot::Go(None);
    };
    if let Ok(p) = slots.clone().try_acquire_owned() {
        return Slot::Go(Some(p));
    }
    let asker_waits = if cached_only {
        r.peer_timeout
    } else {
        r.peer_timeout.saturating_add(r.origin_budget)
    };
    let wait = asker_waits
        .min(SLOT_WAIT_MAX)
        .saturating_sub(SLOT_MARGIN)
        .saturating_sub(started.elapsed());
    Slot::Waited(
        tokio::time::timeout(wait, slots.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok),
    )
}

/// The member whose address has the connection's IP, if exactly one has:
/// where it listens, which a holder is named by. (Its port as a client is
/// not the one it listens on.)
fn member_at(m: &Membership, from: SocketAddr) -> Option<SocketAddr> {
    let ip = from.ip().to_canonical();
    let mut at = m.live().into_iter().filter(|a| a.ip().to_canonical() == ip);
    match (at.next(), at.next()) {
        (Some(a), None) => Some(a),
        _ => None,
    }
}

/// One chunk body being sent: counted in `uploads` until it is done or
/// dropped, and its asker recorded as a holder only once all of it went out.
struct Upload {
    uploads: Arc<AtomicUsize>,
    /// Dropped with the upload, which gives its slot back.
    _done: Option<tokio::sync::oneshot::Sender<()>>,
    holder: Option<(Arc<Holders>, u128, SocketAddr)>,
}

impl Upload {
    fn start(
        s: &Server,
        holder: Option<(u128, SocketAddr)>,
        slot: Option<OwnedSemaphorePermit>,
        len: usize,
    ) -> Upload {
        s.uploads.fetch_add(1, SeqCst);
        // An asker that stops reading would keep its slot for as long as the
        // connection lives; by this bound it has given up on the chunk
        // itself (see `PeerClient`), and the slot goes to the next.
        let bound = HEADER_TIMEOUT
            + Duration::from_secs_f64(len as f64 / super::client::MIN_PEER_RATE as f64);
        let done = slot.map(|permit| {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(bound, rx).await;
                drop(permit);
            });
            tx
        });
        Upload {
            _done: done,
            uploads: s.uploads.clone(),
            holder: holder.map(|(id, a)| (s.holders.clone(), id, a)),
        }
    }

    fn body(self, mut rest: bytes::Bytes) -> Body {
        Body::from_stream(futures::stream::unfold(Some(self), move |upload| {
            let piece = rest.split_to(PIECE.min(rest.len()));
            async move {
                let upload = upload?;
                if piece.is_empty() {
                    if let Some((holders, id, a)) = &upload.holder {
                        holders.add(*id, *a);
                    }
                    return None;
                }
                Some((Ok::<_, std::convert::Infallible>(piece), Some(upload)))
            }
        }))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.uploads.fetch_sub(1, SeqCst);
    }
}
