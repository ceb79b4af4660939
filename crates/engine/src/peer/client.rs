//! Chunk GETs to a peer or the warm-up service, each checked against the
//! crc32c the server sends.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;

use super::{CRC_HEADER, HOLDERS_HEADER, NODE_HEADER, REDIRECT_HEADER};
use crate::{Error, FileVersion, Result};

/// What to ask a peer for.
pub struct ChunkRequest<'a> {
    /// The file's name on every node alike: its source URL and path.
    pub object: &'a str,
    pub file: &'a FileVersion,
    pub chunk_size: u64,
    pub index: u64,
    /// The chunk's length, which the answer must have.
    pub len: u64,
    /// Answer from the cache or not at all; never fetch.
    pub cached_only: bool,
    /// A busy owner may answer with holders of the chunk instead
    /// (`Error::Redirected`).
    pub may_redirect: bool,
}

/// The slowest a peer may send a chunk's body once it has answered: a
/// peer below it is stalled or overloaded, and the origin is the better bet.
pub const MIN_PEER_RATE: u64 = 1 << 20;

#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    /// Sends from this node's `--listen` address, to peers of its family.
    bound: Option<(IpAddr, reqwest::Client)>,
    token: String,
    /// This node's id, sent with every request (see `NODE_HEADER`).
    node: String,
    /// Bounds connecting and the answer's headers (its first byte).
    timeout: Duration,
    /// More time for the first byte when the peer fetches for the group.
    origin_budget: Duration,
}

impl PeerClient {
    /// `timeout` bounds connecting and the first byte of an answer from a
    /// peer's cache; a peer asked to fetch for the group may first wait on
    /// the origin, so its first byte gets `origin_budget` more (giving up
    /// sooner would send this node to the same busy origin: each chunk twice).
    /// The body must then come at `MIN_PEER_RATE` or better. So a hung peer
    /// costs a read at most `timeout (+ origin_budget) + max(timeout, chunk /
    /// MIN_PEER_RATE)` before the next tier.
    /// With `tls`, peers are asked over https and must show a certificate
    /// of the group's CA. With `local`, requests leave from that address
    /// (where this node listens), by which an owner knows which member it
    /// sent a chunk to.
    pub fn new(
        token: String,
        node: String,
        timeout: Duration,
        origin_budget: Duration,
        tls: Option<&super::TlsFiles>,
        local: Option<IpAddr>,
    ) -> Result<Self> {
        let client = |local: Option<IpAddr>| {
            let mut b = reqwest::Client::builder().local_address(local);
            if let Some(t) = tls {
                b = t.client(b)?;
            }
            b.connect_timeout(timeout)
                .pool_max_idle_per_host(32)
                // Before the server's own idle limit (`HEADER_TIMEOUT`), so a
                // pooled connection is rarely one the server has just closed.
                .pool_idle_timeout(super::server::HEADER_TIMEOUT / 2)
                .build()
                .map_err(|e| Error::Config(format!("peer client: {e}")))
        };
        // Several nodes on one host's loopback addresses would all ask from
        // 127.0.0.1, and owners could not tell which member they served: there
        // requests go out from the --listen address. Elsewhere the kernel picks
        // (a pod's or host's own address is what owners see anyway), since a
        // socket bound to a loopback, link-local or policy-routed address may
        // not reach the peer at all; names and the other family go unbound.
        let bound = match local {
            Some(ip) => Some((ip, client(Some(ip))?)),
            None => None,
        };
        Ok(PeerClient {
            http: client(None)?,
            bound,
            token,
            node,
            timeout,
            origin_budget,
        })
    }

    /// This node's id (random per start).
    pub fn node(&self) -> &str {
        &self.node
    }

    fn http_for(&self, base: &str) -> &reqwest::Client {
        let peer = base
            .split_once("://")
            .and_then(|(_, a)| a.parse::<std::net::SocketAddr>().ok());
        match (&self.bound, peer) {
            (Some((ip, c)), Some(p))
                if ip.is_loopback() && p.ip().is_loopback() && ip.is_ipv4() == p.is_ipv4() =>
            {
                c
            }
            _ => &self.http,
        }
    }

    fn body_bound(&self, len: u64) -> Duration {
        self.timeout
            .max(Duration::from_secs_f64(len as f64 / MIN_PEER_RATE as f64))
    }

    /// One chunk from the server at `base` (http://host:port).
    pub async fn chunk(&self, base: &str, req: &ChunkRequest<'_>) -> Result<Bytes> {
        let fail = |msg: String| Error::Unavailable(format!("{base}: {msg}"));
        let file = req.file;
        let index = req.index;
        let size = file.size.to_string();
        let idx = index.to_string();
        let cs = req.chunk_size.to_string();
        let mut get = self.http_for(base).get(format!("{base}/v1/chunk"));
        if req.may_redirect {
            get = get.header(REDIRECT_HEADER, "1");
        }
        let resp = get
            .query(&[
                ("object", req.object),
                ("version", file.version.as_str()),
                ("size", size.as_str()),
                ("chunk_size", cs.as_str()),
                ("index", idx.as_str()),
                ("cached_only", if req.cached_only { "1" } else { "0" }),
            ])
            .bearer_auth(&self.token)
            .header(NODE_HEADER, &self.node)
            .send();
        // Connecting and the first byte: a peer that accepts and never
        // answers is given up on here.
        let first_byte = if req.cached_only {
            self.timeout
        } else {
            self.timeout.saturating_add(self.origin_budget)
        };
        let resp = match tokio::time::timeout(first_byte, resp).await {
            Ok(r) => r.map_err(|e| fail(e.to_string()))?,
            Err(_) => return Err(fail(format!("no answer within {first_byte:?}"))),
        };
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            // A miss, not a failure: the peer is fine.
            return Err(Error::NotFound(format!("{base}: {}", file.path)));
        }
        if resp.status() == reqwest::StatusCode::MISDIRECTED_REQUEST
            && resp
                .headers()
                .get(NODE_HEADER)
                .and_then(|v| v.to_str().ok())
                == Some(self.node.as_str())
        {
            return Err(Error::ToSelf(base.to_string()));
        }
        if resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS && req.may_redirect {
            let holders: Vec<std::net::SocketAddr> = resp
                .headers()
                .get(HOLDERS_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').filter_map(|a| a.trim().parse().ok()).collect())
                .unwrap_or_default();
            if !holders.is_empty() {
                return Err(Error::Redirected(holders));
            }
        }
        if !resp.status().is_success() {
            return Err(fail(format!("status {}", resp.status())));
        }
        let crc = resp
            .headers()
            .get(CRC_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u32::from_str_radix(v, 16).ok())
            .ok_or_else(|| fail("no crc32c header".into()))?;
        let bound = self.body_bound(req.len);
        let body = match tokio::time::timeout(bound, resp.bytes()).await {
            Ok(b) => b.map_err(|e| fail(e.to_string()))?,
            Err(_) => {
                return Err(fail(format!(
                    "the chunk did not arrive within {bound:?} (slower than 1 MiB/s)"
                )))
            }
        };
        if body.len() as u64 != req.len || crc32c::crc32c(&body) != crc {
            return Err(Error::Corrupt {
                path: format!("{} (from {base})", file.path),
                index,
            });
        }
        Ok(body)
    }
}
