//! The source's tree as the mount shows it: listings cached for a TTL so a
//! model directory costs one listing, and fresh stats where correctness needs
//! them (at open).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::singleflight::SingleFlight;
use crate::source::join;
use crate::{DirEntry, Error, ObjectMeta, Result, Source};

type Listing = Arc<Vec<DirEntry>>;

pub struct Namespace {
    source: Arc<dyn Source>,
    ttl: Duration,
    listings: Mutex<HashMap<String, (Instant, Listing)>>,
    flights: SingleFlight<String, Listing>,
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

impl Namespace {
    pub fn new(source: Arc<dyn Source>, ttl: Duration) -> Self {
        Namespace {
            source,
            ttl,
            listings: Mutex::default(),
            flights: SingleFlight::default(),
        }
    }

    pub async fn list(&self, dir: &str) -> Result<Listing> {
        if let Some((at, l)) = self.listings.lock().get(dir) {
            if at.elapsed() < self.ttl {
                return Ok(l.clone());
            }
        }
        let source = self.source.clone();
        let d = dir.to_string();
        let listing = self
            .flights
            .run(dir.to_string(), move || async move {
                Ok(Arc::new(source.list(&d).await?))
            })
            .await?;
        self.listings
            .lock()
            .insert(dir.to_string(), (Instant::now(), listing.clone()));
        Ok(listing)
    }

    /// Metadata from the parent's listing (within the TTL).
    pub async fn lookup(&self, path: &str) -> Result<ObjectMeta> {
        if path.is_empty() {
            return self.source.stat("").await;
        }
        let (dir, name) = split(path);
        let listing = self.list(dir).await?;
        listing
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.meta.clone())
            .ok_or_else(|| Error::NotFound(path.to_string()))
    }

    /// Metadata straight from the source, written back into the cached
    /// listing so later lookups agree with it. Only "not found" takes a file
    /// out of the listing: a timeout or a 5xx says nothing about the file, so
    /// the listing stays as it was and the next open asks again.
    pub async fn revalidate(&self, path: &str) -> Result<ObjectMeta> {
        let fresh = self.source.stat(path).await;
        if matches!(fresh, Err(ref e) if !matches!(e, Error::NotFound(_))) {
            return fresh;
        }
        let (dir, name) = split(path);
        let mut listings = self.listings.lock();
        if let Some((_, listing)) = listings.get_mut(dir) {
            let mut entries: Vec<DirEntry> =
                listing.iter().filter(|e| e.name != name).cloned().collect();
            if let Ok(meta) = &fresh {
                entries.push(DirEntry {
                    name: name.to_string(),
                    meta: meta.clone(),
                });
                entries.sort_by(|a, b| a.name.cmp(&b.name));
            }
            *listing = Arc::new(entries);
        }
        fresh
    }

    /// Every file under `path` (or `path` itself if it is a file).
    pub async fn walk(&self, path: &str) -> Result<Vec<(String, ObjectMeta)>> {
        let path = path.trim_matches('/');
        let meta = self.lookup(path).await?;
        if !meta.is_dir {
            return Ok(vec![(path.to_string(), meta)]);
        }
        let (mut files, mut dirs) = (vec![], vec![path.to_string()]);
        while let Some(d) = dirs.pop() {
            for e in self.list(&d).await?.iter() {
                let p = join(&d, &e.name);
                if e.meta.is_dir {
                    dirs.push(p);
                } else {
                    files.push((p, e.meta.clone()));
                }
            }
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(files)
    }

    pub fn child(dir: &str, name: &str) -> String {
        join(dir, name)
    }
}
