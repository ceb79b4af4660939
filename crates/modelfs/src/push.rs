//! `modelfs push DIR URL`: upload a model directory, with a progress bar.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use modelfs_engine::push::{push, PushOptions};
use modelfs_engine::size::ByteSize;

use crate::args::{progress_bar, SourceArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// The local model directory
    pub dir: PathBuf,
    /// Where to: s3://bucket/prefix, oss://, gs://, azblob://, or a directory
    pub url: String,
    /// Files uploaded at once
    #[arg(long, default_value_t = 4)]
    pub files: usize,
    /// Parts of one file uploaded at once
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Multipart part size
    #[arg(long, default_value = "16MiB")]
    pub part_size: ByteSize,
    /// Skip reading each uploaded object back to check its crc32c
    #[arg(long)]
    pub no_read_back: bool,
    #[command(flatten)]
    pub store: SourceArgs,
}

pub fn run(args: PushArgs) -> Result<()> {
    let opts = PushOptions {
        files_concurrency: args.files,
        part_concurrency: args.concurrency,
        part_size: args.part_size.0 as usize,
        read_back: !args.no_read_back,
    };
    let src = args.store.options()?;
    let bar = progress_bar(0)?;
    let t = Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(push(
        &args.dir,
        &args.url,
        &src,
        &opts,
        |total| bar.set_length(total),
        &|n| bar.inc(n),
    ))?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    say!(
        "modelfs: pushed {} files ({}, {:.0} MB/s), {} already there, to {}{}",
        report.uploaded.len(),
        ByteSize(report.bytes_uploaded),
        report.bytes_uploaded as f64 / secs / 1e6,
        report.skipped.len(),
        args.url,
        if opts.read_back {
            "; every upload read back and verified"
        } else {
            ""
        }
    );
    Ok(())
}
