//! `--metrics-listen`: the mount's counters for Prometheus, exported by
//! metrics-exporter-prometheus. The engine keeps its own atomics (they feed
//! `stat`); this copies them into the metrics registry every two seconds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use modelfs_engine::Engine;

pub fn export(addr: SocketAddr, engine: Arc<Engine>, rt: &tokio::runtime::Handle) -> Result<()> {
    let _guard = rt.enter();
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("--metrics-listen {addr}"))?;
    rt.spawn(async move {
        loop {
            let s = engine.snapshot();
            for (name, v) in [
                ("modelfs_bytes_served_total", s.bytes_served),
                ("modelfs_bytes_from_cache_total", s.bytes_from_cache),
                ("modelfs_bytes_from_source_total", s.bytes_from_source),
                ("modelfs_bytes_from_peers_total", s.bytes_from_peers),
                ("modelfs_bytes_from_warmup_total", s.bytes_from_warmup),
                ("modelfs_chunks_evicted_total", s.chunks_evicted),
                ("modelfs_chunks_prefetched_total", s.chunks_prefetched),
                (
                    "modelfs_chunks_served_to_peers_total",
                    s.chunks_served_to_peers,
                ),
                ("modelfs_crc_failures_total", s.crc_failures),
                ("modelfs_source_requests_total", s.source_requests),
                ("modelfs_source_errors_total", s.source_errors),
                ("modelfs_read_errors_total", s.read_errors),
                ("modelfs_passthrough_opens_total", s.passthrough_opens),
            ] {
                counter!(name).absolute(v);
            }
            gauge!("modelfs_cache_bytes_used").set(s.cache_bytes_used as f64);
            gauge!("modelfs_cache_bytes_capacity").set(s.cache_bytes_capacity as f64);
            gauge!("modelfs_chunks_cached").set(s.chunks_cached as f64);
            for (peer, c) in &s.peers {
                counter!("modelfs_peer_bytes_total", "peer" => peer.clone()).absolute(c.bytes);
                counter!("modelfs_peer_errors_total", "peer" => peer.clone()).absolute(c.errors);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    Ok(())
}
