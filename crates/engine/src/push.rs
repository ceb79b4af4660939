//! `modelfs push`: upload a local model directory to a source URL with
//! parallel multipart uploads, skipping files already there with the same
//! size and crc32c, and checking what was written.

use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use opendal::Operator;
use tokio::io::AsyncReadExt;

use crate::source::{operator, SourceOptions};
use crate::{Error, Result};

/// User metadata holding the whole object's crc32c, written by push; a bare
/// identifier, the one form every service (Azure included) accepts.
const CRC_KEY: &str = "modelfscrc32c";

#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Files uploaded at once.
    pub files_concurrency: usize,
    /// Parts of one file uploaded at once.
    pub part_concurrency: usize,
    pub part_size: usize,
    /// Read every uploaded object back and compare its crc32c.
    pub read_back: bool,
}

#[derive(Debug, Default, Clone)]
pub struct PushReport {
    pub uploaded: Vec<String>,
    pub skipped: Vec<String>,
    pub bytes_uploaded: u64,
}

fn walk(root: &Path) -> Result<Vec<(String, PathBuf, u64)>> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        for e in rd {
            let e = e.map_err(|e| Error::io(dir.display().to_string(), e))?;
            let p = e.path();
            let m = std::fs::metadata(&p).map_err(|e| Error::io(p.display().to_string(), e))?;
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                let rel = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, p, m.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

async fn file_crc(path: &Path) -> Result<u32> {
    let ctx = |e| Error::io(path.display().to_string(), e);
    let mut f = tokio::fs::File::open(path).await.map_err(ctx)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut crc = 0;
    loop {
        let n = f.read(&mut buf).await.map_err(ctx)?;
        if n == 0 {
            return Ok(crc);
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
}

async fn object_crc(op: &Operator, path: &str) -> Result<u32> {
    let err = |e: opendal::Error| Error::Source {
        path: path.to_string(),
        msg: e.to_string(),
    };
    let mut stream = op
        .reader_with(path)
        .chunk(8 << 20)
        .concurrent(4)
        .await
        .map_err(err)?
        .into_bytes_stream(..)
        .await
        .map_err(err)?;
    let mut crc = 0;
    while let Some(b) = stream.try_next().await.map_err(|e| Error::io(path, e))? {
        crc = crc32c::crc32c_append(crc, &b);
    }
    Ok(crc)
}

async fn push_one(
    op: &Operator,
    rel: &str,
    local: &Path,
    size: u64,
    opts: &PushOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<bool> {
    let err = |e: opendal::Error| Error::Source {
        path: rel.to_string(),
        msg: e.to_string(),
    };
    let crc = format!("{:08x}", file_crc(local).await?);
    if let Ok(m) = op.stat(rel).await {
        let same = m.content_length() == size
            && m.user_metadata().and_then(|u| u.get(CRC_KEY)) == Some(&crc);
        if same {
            progress(size);
            return Ok(false);
        }
    }
    let mut w = op
        .writer_with(rel)
        .chunk(opts.part_size)
        .concurrent(opts.part_concurrency)
        .user_metadata([(CRC_KEY.to_string(), crc.clone())])
        .await
        .map_err(err)?;
    let ctx = |e| Error::io(local.display().to_string(), e);
    let mut f = tokio::fs::File::open(local).await.map_err(ctx)?;
    loop {
        let mut buf = vec![0u8; opts.part_size];
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..]).await.map_err(ctx)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        w.write(buf).await.map_err(err)?;
        progress(filled as u64);
    }
    w.close().await.map_err(err)?;
    let m = op.stat(rel).await.map_err(err)?;
    if m.content_length() != size {
        return Err(Error::Source {
            path: rel.into(),
            msg: format!(
                "uploaded {} bytes but the store holds {}",
                size,
                m.content_length()
            ),
        });
    }
    if opts.read_back {
        let back = format!("{:08x}", object_crc(op, rel).await?);
        if back != crc {
            return Err(Error::Source {
                path: rel.into(),
                msg: format!("read back crc32c {back}, uploaded {crc}"),
            });
        }
    }
    Ok(true)
}

/// Uploads every file under `local` to `url`; `progress` gets bytes as they
/// are done (skipped files count at once). `total` is called first with the
/// bytes to go.
pub async fn push(
    local: &Path,
    url: &str,
    src: &SourceOptions,
    opts: &PushOptions,
    total: impl FnOnce(u64),
    progress: &(dyn Fn(u64) + Sync),
) -> Result<PushReport> {
    if !local.is_dir() {
        return Err(Error::Config(format!(
            "{} is not a directory",
            local.display()
        )));
    }
    let (_, op) = operator(url, src)?;
    let files = walk(local)?;
    total(files.iter().map(|f| f.2).sum());
    let results: Vec<(String, u64, Result<bool>)> = futures::stream::iter(files)
        .map(|(rel, path, size)| {
            let op = op.clone();
            async move {
                let r = push_one(&op, &rel, &path, size, opts, progress).await;
                (rel, size, r)
            }
        })
        .buffer_unordered(opts.files_concurrency.max(1))
        .collect()
        .await;
    let mut report = PushReport::default();
    for (rel, size, r) in results {
        match r? {
            true => {
                report.bytes_uploaded += size;
                report.uploaded.push(rel);
            }
            false => report.skipped.push(rel),
        }
    }
    report.uploaded.sort();
    report.skipped.sort();
    Ok(report)
}
