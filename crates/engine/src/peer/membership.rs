//! Who is in the group: a static list or a DNS name re-resolved every few
//! seconds (A and AAAA), minus peers that failed recently (backed off for a
//! while) and peers caught lying (for good). A DNS name that does not resolve yet is no error: a new headless
//! Service has no records until its pods exist, so the node starts alone.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{info, warn};

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub enum PeerSpec {
    Static(Vec<String>),
    /// `dns:NAME:PORT`, as a Kubernetes headless Service names its pods.
    Dns(String, u16),
}

impl std::str::FromStr for PeerSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(rest) = s.strip_prefix("dns:") {
            let (name, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("--peers {s}: write dns:NAME:PORT"))?;
            let port = port.parse().map_err(|_| format!("--peers {s}: bad port"))?;
            return Ok(PeerSpec::Dns(name.to_string(), port));
        }
        let list: Vec<String> = s
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        if list.is_empty() || list.iter().any(|p| !p.contains(':')) {
            return Err(format!(
                "--peers {s}: write host:port,host:port or dns:NAME:PORT"
            ));
        }
        Ok(PeerSpec::Static(list))
    }
}

/// How often a `dns:` name is resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

pub struct Membership {
    spec: PeerSpec,
    listen: Option<SocketAddr>,
    /// This node's own address among the members, if it is one; found again
    /// whenever the members change.
    me: Mutex<Option<SocketAddr>>,
    /// Member addresses whose requests came back to this node (refused with
    /// its own id): this node too, however many there are. Kept across
    /// membership changes, since this node keeps its addresses while it runs.
    selves: Mutex<HashSet<SocketAddr>>,
    members: Mutex<Vec<SocketAddr>>,
    backoff: Mutex<HashMap<SocketAddr, Instant>>,
    backoff_for: Duration,
    /// Peers that sent a chunk that differs from the origin's: never asked
    /// again while this process runs, and no owners here, so the chunks
    /// they owned get another. Kept across membership changes: a liar that
    /// leaves and comes back is the same liar.
    quarantined: Mutex<HashSet<SocketAddr>>,
}

fn local_ips() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|i| i.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn resolve(spec: &PeerSpec) -> Result<Vec<SocketAddr>> {
    let names: Vec<String> = match spec {
        PeerSpec::Static(l) => l.clone(),
        PeerSpec::Dns(n, p) => vec![format!("{n}:{p}")],
    };
    let mut out = vec![];
    for n in names {
        let addrs = tokio::net::lookup_host(&n)
            .await
            .map_err(|e| Error::Config(format!("peer {n}: {e}")))?;
        out.extend(addrs);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// This node among `members`: its `--listen` address, or when that is
/// 0.0.0.0 or ::, a member on its port at one of this host's addresses.
fn find_me(listen: Option<SocketAddr>, members: &[SocketAddr]) -> Option<SocketAddr> {
    let l = listen?;
    if !l.ip().is_unspecified() {
        return Some(l);
    }
    let ips = local_ips();
    members
        .iter()
        .copied()
        .find(|m| m.port() == l.port() && ips.contains(&m.ip()))
}

impl Membership {
    /// Resolves the peers once and keeps DNS names fresh in the background.
    /// A static list that does not resolve is a configuration error; a DNS
    /// name that does not resolve yet starts the node alone.
    pub async fn start(spec: PeerSpec, listen: Option<SocketAddr>) -> Result<Arc<Self>> {
        let members = match resolve(&spec).await {
            Ok(m) => m,
            Err(e) if matches!(spec, PeerSpec::Dns(..)) => {
                warn!("{e}; starting alone, resolving again every {RESOLVE_EVERY:?}");
                vec![]
            }
            Err(e) => return Err(e),
        };
        let me = find_me(listen, &members);
        info!(?members, ?me, "peer group");
        let m = Arc::new(Membership {
            spec,
            listen,
            me: Mutex::new(me),
            selves: Mutex::default(),
            members: Mutex::new(members),
            backoff: Mutex::default(),
            backoff_for: Duration::from_secs(10),
            quarantined: Mutex::default(),
        });
        if matches!(m.spec, PeerSpec::Dns(..)) {
            let weak = Arc::downgrade(&m);
            tokio::spawn(async move {
                let mut failing = false;
                loop {
                    tokio::time::sleep(RESOLVE_EVERY).await;
                    let Some(m) = weak.upgrade() else { break };
                    match resolve(&m.spec).await {
                        Ok(new) => {
                            failing = false;
                            m.update(new);
                        }
                        // A failed lookup keeps the members we know: a DNS
                        // hiccup must not break the group up.
                        Err(e) if !failing => {
                            failing = true;
                            warn!("re-resolving peers: {e}; keeping {:?}", m.members.lock());
                        }
                        Err(_) => {}
                    }
                }
            });
        }
        Ok(m)
    }

    fn update(&self, new: Vec<SocketAddr>) {
        let mut members = self.members.lock();
        if *members == new {
            return;
        }
        let me = find_me(self.listen, &new);
        info!(members = ?new, ?me, "peer group changed");
        *self.me.lock() = me;
        *members = new;
    }

    pub fn me(&self) -> Option<SocketAddr> {
        *self.me.lock()
    }

    /// Whether `addr` is this node: its own address as worked out from
    /// `--listen`, or one a request of its own came back from.
    pub fn is_me(&self, addr: SocketAddr) -> bool {
        self.me() == Some(addr) || self.selves.lock().contains(&addr)
    }

    /// `addr` answered with this node's own id: it is this node.
    pub fn mark_self(&self, addr: SocketAddr) {
        if self.selves.lock().insert(addr) {
            info!(%addr, "a peer address turned out to be this node's own");
        }
    }

    /// Members neither backed off nor quarantined, this node included.
    pub fn live(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut backoff = self.backoff.lock();
        backoff.retain(|_, until| *until > now);
        let quarantined = self.quarantined.lock();
        self.members
            .lock()
            .iter()
            .filter(|m| !backoff.contains_key(m) && !quarantined.contains(m))
            .copied()
            .collect()
    }

    pub fn quarantine(&self, peer: SocketAddr) {
        self.quarantined.lock().insert(peer);
    }

    pub fn back_off(&self, peer: SocketAddr) {
        warn!(%peer, "peer failed; skipping it for {:?}", self.backoff_for);
        self.backoff
            .lock()
            .insert(peer, Instant::now() + self.backoff_for);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_static_lists_and_dns_names() {
        let s: PeerSpec = "10.0.0.1:7070, 10.0.0.2:7070".parse().unwrap();
        assert!(matches!(s, PeerSpec::Static(l) if l.len() == 2));
        let d: PeerSpec = "dns:modelfs-qwen.default.svc.cluster.local:7070"
            .parse()
            .unwrap();
        assert!(
            matches!(d, PeerSpec::Dns(n, 7070) if n == "modelfs-qwen.default.svc.cluster.local")
        );
        assert!("nonsense".parse::<PeerSpec>().is_err());
        assert!("dns:noport".parse::<PeerSpec>().is_err());
    }

    #[tokio::test]
    async fn dns_members_resolve_and_this_node_is_found_among_them() {
        let m = Membership::start(
            PeerSpec::Dns("localhost".into(), 7070),
            Some("0.0.0.0:7070".parse().unwrap()),
        )
        .await
        .unwrap();
        // localhost may also be ::1 (Debian's and Docker's /etc/hosts).
        let me: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        assert!(m.live().contains(&me), "{:?}", m.live());
        assert_eq!(
            m.me(),
            Some(me),
            "0.0.0.0 matched against this host's addresses"
        );
        m.back_off(me);
        assert!(!m.live().contains(&me));
        let bad = Membership::start(
            PeerSpec::Static(vec!["no-such-host.invalid:1".into()]),
            None,
        )
        .await;
        assert!(bad.is_err());
    }

    #[tokio::test]
    async fn a_dns_name_that_does_not_resolve_yet_starts_alone() {
        let m = Membership::start(
            PeerSpec::Dns("no-such-host.invalid".into(), 7070),
            Some("0.0.0.0:7070".parse().unwrap()),
        )
        .await
        .unwrap();
        assert!(m.live().is_empty());
        assert_eq!(m.me(), None);
        let both: Vec<SocketAddr> = vec![
            "127.0.0.1:7070".parse().unwrap(),
            "[::1]:7070".parse().unwrap(),
        ];
        m.update(both.clone());
        assert_eq!(m.live(), both, "IPv4 and IPv6 members");
        assert_eq!(m.me(), Some(both[0]));
    }

    #[tokio::test]
    async fn addresses_that_answered_with_this_nodes_id_are_its_own() {
        let a: SocketAddr = "127.0.0.2:7070".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:7070".parse().unwrap();
        let m = Membership::start(
            PeerSpec::Static(vec![a.to_string(), b.to_string()]),
            Some("0.0.0.0:7070".parse().unwrap()),
        )
        .await
        .unwrap();
        assert!(!m.is_me(a) && !m.is_me(b));
        m.mark_self(a);
        assert!(m.is_me(a) && !m.is_me(b));
        // Still a member: every node ranks the same list, so owners agree.
        assert_eq!(m.live(), vec![a, b]);
        m.update(vec![a]);
        assert!(m.is_me(a), "kept across membership changes");
    }

    #[tokio::test]
    async fn a_quarantined_peer_is_never_live_again() {
        let a: SocketAddr = "127.0.0.2:7070".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:7070".parse().unwrap();
        let m = Membership::start(PeerSpec::Static(vec![a.to_string(), b.to_string()]), None)
            .await
            .unwrap();
        m.quarantine(b);
        assert_eq!(m.live(), vec![a]);
        m.update(vec![b]);
        m.update(vec![a, b]);
        assert_eq!(m.live(), vec![a], "kept across membership changes");
    }
}
