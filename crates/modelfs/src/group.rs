//! Flags and wiring of the peer group and the warm-up service, shared by
//! `mount` and `serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use modelfs_engine::peer::{
    self, ChunkAsker, Membership, PeerClient, PeerSpec, PeerTier, Redirects, TlsAcceptor, TlsFiles,
    WarmupTier,
};
use modelfs_engine::stats::Stats;
use modelfs_engine::tier::Tier;
use modelfs_engine::Engine;
use tracing::{error, info};

use crate::args::secs;

#[derive(Debug, Clone, clap::Args)]
pub struct GroupArgs {
    /// The service's instances: host:port,host:port or dns:NAME:PORT (A and AAAA, re-resolved
    /// every 5 s; a name that does not resolve yet starts this node alone)
    #[arg(long)]
    pub peers: Option<PeerSpec>,
    /// Serve this node's chunks to the group on ADDR:PORT
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// A warm-up service (modelfs serve) to ask before the origin: http://host:port
    #[arg(long)]
    pub warmup_service: Option<String>,
    /// File holding the group's shared token (required with the options above)
    #[arg(long)]
    pub peer_token_file: Option<PathBuf>,
    /// Serve /metrics (Prometheus), /healthz and /readyz on ADDR:PORT, without the token
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds to connect to a peer and get the first byte from its cache (a peer that fetches
    /// for the group also gets the origin's budget); the chunk must then come at 1 MiB/s or better
    #[arg(long, default_value_t = 5.0)]
    pub peer_timeout: f64,
    /// Chunks the peer port sends at once (more wait); past it, an owner names members that
    /// already hold a chunk to further askers instead (0: one at a time, always naming them)
    #[arg(long, default_value_t = 4)]
    pub peer_upload_limit: usize,
    /// Fraction of the chunks peers and the warm-up service send (0 to 1) that is read from the
    /// origin too and compared; a server whose chunk differs is never asked again. Costs RATE x
    /// the bytes got from them in origin traffic
    // Text, parsed in `Group::start`: clap's own error for a bad number
    // (or a negative one, taken for a flag) is several lines.
    #[arg(
        long,
        value_name = "RATE",
        default_value = "0",
        allow_hyphen_values = true
    )]
    pub peer_verify_sample: String,
    #[command(flatten)]
    pub tls: PeerTlsArgs,
}

/// TLS between peers, with the group's own CA.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PeerTlsArgs {
    /// This node's certificate (PEM), signed by the group's CA: peers are served and asked
    /// over https
    #[arg(long, requires = "peer_tls_key")]
    pub peer_tls_cert: Option<PathBuf>,
    /// The private key of --peer-tls-cert (PEM)
    #[arg(long, requires = "peer_tls_cert")]
    pub peer_tls_key: Option<PathBuf>,
    /// The group's CA (PEM): peers' certificates are checked against it, and a server given it
    /// requires clients to show one (mTLS)
    #[arg(long, requires = "peer_tls_cert")]
    pub peer_tls_ca: Option<PathBuf>,
}

impl PeerTlsArgs {
    fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.peer_tls_cert.clone()?,
            key: self.peer_tls_key.clone()?,
            ca: self.peer_tls_ca.clone(),
        })
    }
}

pub struct Group {
    membership: Option<Arc<Membership>>,
    client: Option<PeerClient>,
    listener: Option<std::net::TcpListener>,
    token: String,
    /// Random per start; carried by every peer request (see `peer::NODE_HEADER`).
    node: String,
    warmup: Option<String>,
    source: String,
    chunk_size: u64,
    metrics_listen: Option<SocketAddr>,
    /// The peer port's TLS, when `--peer-tls-cert` is given.
    acceptor: Option<TlsAcceptor>,
    scheme: &'static str,
    upload_limit: usize,
    /// What an asker here waits for the first byte of a chunk: the peer
    /// port's slot queue must not outlast it.
    peer_timeout: std::time::Duration,
    origin_budget: std::time::Duration,
    /// `--peer-verify-sample`, for the engine, which checks its range.
    pub verify_sample: f64,
}

impl Group {
    /// Checks the flags, resolves the peers and takes the listening port, all
    /// before anything is mounted.
    /// `origin_budget` is how long the origin may take for one chunk,
    /// retries included.
    pub async fn start(
        a: &GroupArgs,
        source: &str,
        chunk_size: u64,
        origin_budget: std::time::Duration,
    ) -> Result<Group> {
        let wanted = a.peers.is_some() || a.listen.is_some() || a.warmup_service.is_some();
        let token = match (&a.peer_token_file, wanted) {
            (Some(f), _) => peer::read_token(f)?,
            (None, true) => bail!("--peers, --listen and --warmup-service need --peer-token-file: every peer request carries the group's token"),
            (None, false) => String::new(),
        };
        let listener = match a.listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("--listen {addr}"))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let membership = match &a.peers {
            Some(spec) => Some(Membership::start(spec.clone(), a.listen).await?),
            None => None,
        };
        let timeout = secs(a.peer_timeout, "--peer-timeout")?;
        let verify_sample = a.peer_verify_sample.trim().parse().map_err(|_| {
            anyhow!(
                "--peer-verify-sample {}: give the fraction of chunks to check, from 0 to 1",
                a.peer_verify_sample
            )
        })?;
        let node = peer::new_node_id();
        let tls = a.tls.files();
        let acceptor = match (&tls, a.listen) {
            (Some(t), Some(_)) => Some(t.acceptor()?),
            _ => None,
        };
        let client = wanted
            .then(|| {
                // Only a node that asks others needs the CA to check them by.
                let asks = a.peers.is_some() || a.warmup_service.is_some();
                let tls = tls.as_ref().filter(|_| asks);
                // Several nodes of one host (loopback addresses) would all
                // send from the same address otherwise.
                let local = a.listen.map(|l| l.ip()).filter(|ip| !ip.is_unspecified());
                PeerClient::new(
                    token.clone(),
                    node.clone(),
                    timeout,
                    origin_budget,
                    tls,
                    local,
                )
            })
            .transpose()?;
        if let Some(w) = &a.warmup_service {
            let want = if tls.is_some() { "https://" } else { "http://" };
            if !w.starts_with(want) {
                bail!("--warmup-service {w}: write it as {want}host:port (https:// with --peer-tls-cert, http:// without)");
            }
        }
        Ok(Group {
            membership,
            client,
            listener,
            token,
            node,
            warmup: a
                .warmup_service
                .clone()
                .map(|w| w.trim_end_matches('/').to_string()),
            source: source.to_string(),
            chunk_size,
            metrics_listen: a.metrics_listen,
            acceptor,
            scheme: if tls.is_some() { "https" } else { "http" },
            upload_limit: a.peer_upload_limit,
            peer_timeout: timeout,
            origin_budget,
            verify_sample,
        })
    }

    /// Owner peer, then the warm-up service, in front of the origin.
    pub fn tiers(&self, stats: &Arc<Stats>) -> Vec<Arc<dyn Tier>> {
        let mut t: Vec<Arc<dyn Tier>> = vec![];
        let Some(client) = &self.client else { return t };
        let asker = || ChunkAsker {
            client: client.clone(),
            source: self.source.clone(),
            chunk_size: self.chunk_size,
            stats: stats.clone(),
        };
        if let Some(m) = &self.membership {
            t.push(Arc::new(PeerTier {
                membership: m.clone(),
                scheme: self.scheme,
                asker: asker(),
            }));
        }
        if let Some(base) = &self.warmup {
            t.push(Arc::new(WarmupTier {
                base: base.clone(),
                asker: asker(),
                backoff_until: Default::default(),
                distrusted: Default::default(),
            }));
        }
        t
    }

    /// Starts the chunk server, if this node listens, and the metrics and
    /// health endpoints (`/healthz` asks `mountpoint`, if any).
    pub fn serve(
        &mut self,
        engine: &Arc<Engine>,
        rt: &tokio::runtime::Handle,
        mountpoint: Option<&std::path::Path>,
    ) -> Result<()> {
        if let Some(addr) = self.metrics_listen.take() {
            crate::metrics::export(addr, engine.clone(), rt, mountpoint)?;
        }
        let Some(l) = self.listener.take() else {
            return Ok(());
        };
        let addr = l.local_addr()?;
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(l)?;
        let (engine, token, node) = (engine.clone(), self.token.clone(), self.node.clone());
        let tls = self.acceptor.clone();
        let redirects = self.membership.clone().map(|membership| Redirects {
            membership,
            upload_limit: self.upload_limit,
            peer_timeout: self.peer_timeout,
            origin_budget: self.origin_budget,
        });
        rt.spawn(async move {
            if let Err(e) = peer::serve(engine, listener, token, node, tls, redirects).await {
                error!("peer server on {addr} stopped: {e}");
            }
        });
        info!(%addr, "serving chunks to the group");
        Ok(())
    }
}
