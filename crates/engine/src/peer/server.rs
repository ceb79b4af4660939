//! The chunk server every mount with `--listen` runs, and the warm-up
//! service is. It serves only chunks of files its own source lists at the
//! version asked for, so a request can neither read outside the cache nor
//! make the node cache anything but the source's current files.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::Request;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{CRC_HEADER, NODE_HEADER};
use crate::stats::add;
use crate::{Engine, Error, FileVersion};

struct Server {
    engine: Arc<Engine>,
    token: String,
    node: String,
}

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
) -> std::io::Result<()> {
    let state = Arc::new(Server {
        engine,
        token,
        node,
    });
    let app = Router::new()
        .route("/v1/chunk", get(chunk))
        .route("/v1/health", get(health))
        // The token before anything else, query parsing and unknown paths
        // included.
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    let slots = Arc::new(Semaphore::new(max_connections()));
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
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
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
    headers: HeaderMap,
    q: Result<Query<ChunkQuery>, QueryRejection>,
) -> Response {
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
    let served = if q.cached_only == 1 {
        engine.cached_chunk(&file, q.index)
    } else {
        engine.serve_chunk(&file, q.index).await
    };
    match served {
        Ok(b) => {
            add(&engine.stats().chunks_served_to_peers, 1);
            let crc = format!("{:08x}", crc32c::crc32c(&b));
            (StatusCode::OK, [(CRC_HEADER, crc)], b).into_response()
        }
        Err(Error::NotFound(_)) => refuse(StatusCode::NOT_FOUND, "not cached here"),
        Err(e) => {
            debug!("peer request for {} chunk {}: {e}", file.path, q.index);
            refuse(StatusCode::BAD_GATEWAY, &e.to_string())
        }
    }
}
