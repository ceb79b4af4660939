//! Who is in the group: a static list or a DNS name re-resolved every few
//! seconds, minus peers that failed recently (backed off for a while).

use std::collections::HashMap;
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

pub struct Membership {
    spec: PeerSpec,
    /// This node's own address among the members, if it is one.
    me: Option<SocketAddr>,
    members: Mutex<Vec<SocketAddr>>,
    backoff: Mutex<HashMap<SocketAddr, Instant>>,
    backoff_for: Duration,
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
        out.extend(addrs.filter(|a| a.is_ipv4()));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

impl Membership {
    /// Resolves the peers once (an error here is a configuration error) and
    /// keeps DNS names fresh in the background.
    pub async fn start(spec: PeerSpec, listen: Option<SocketAddr>) -> Result<Arc<Self>> {
        let members = resolve(&spec).await?;
        let me = listen.and_then(|l| {
            if !l.ip().is_unspecified() {
                return Some(l);
            }
            let ips = local_ips();
            members
                .iter()
                .copied()
                .find(|m| m.port() == l.port() && ips.contains(&m.ip()))
        });
        info!(?members, ?me, "peer group");
        let m = Arc::new(Membership {
            spec,
            me,
            members: Mutex::new(members),
            backoff: Mutex::default(),
            backoff_for: Duration::from_secs(10),
        });
        if matches!(m.spec, PeerSpec::Dns(..)) {
            let weak = Arc::downgrade(&m);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let Some(m) = weak.upgrade() else { break };
                    match resolve(&m.spec).await {
                        Ok(new) => *m.members.lock() = new,
                        Err(e) => warn!("re-resolving peers: {e}"),
                    }
                }
            });
        }
        Ok(m)
    }

    pub fn me(&self) -> Option<SocketAddr> {
        self.me
    }

    /// Members not backed off, this node included.
    pub fn live(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut backoff = self.backoff.lock();
        backoff.retain(|_, until| *until > now);
        self.members
            .lock()
            .iter()
            .filter(|m| !backoff.contains_key(m))
            .copied()
            .collect()
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
        let me: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        assert_eq!(m.live(), vec![me]);
        assert_eq!(
            m.me(),
            Some(me),
            "0.0.0.0 matched against this host's addresses"
        );
        m.back_off(me);
        assert!(m.live().is_empty());
        let bad = Membership::start(
            PeerSpec::Static(vec!["no-such-host.invalid:1".into()]),
            None,
        )
        .await;
        assert!(bad.is_err());
    }
}
