//! Turns a source URL into a [`Source`]: a local path (a NAS mount or any
//! folder), `s3://`, `oss://`, `gs://` or `azblob://`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{services, Operator};

use super::{OpendalSource, Source};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// S3 addressing: virtual-hosted (bucket.endpoint) instead of path style.
    pub virtual_host_style: bool,
    /// Bound on one request to an object store, retries excluded.
    pub request_timeout: Duration,
    pub retries: usize,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            endpoint: None,
            region: None,
            virtual_host_style: false,
            request_timeout: Duration::from_secs(30),
            retries: 4,
        }
    }
}

/// The AWS CLI's order: --region (or AWS_REGION), AWS_DEFAULT_REGION, the
/// profile's `region` in ~/.aws/config, then us-east-1.
fn s3_region(opts: &SourceOptions, env: impl Fn(&str) -> Option<String>) -> String {
    opts.region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| profile_setting(&env, "region"))
        .unwrap_or_else(|| "us-east-1".into())
}

/// --endpoint (or MODELFS_ENDPOINT), then the AWS SDKs' AWS_ENDPOINT_URL_S3,
/// AWS_ENDPOINT_URL and the profile's `endpoint_url`.
fn s3_endpoint(opts: &SourceOptions, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    opts.endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| profile_setting(&env, "endpoint_url"))
}

/// `key` of the AWS profile (AWS_PROFILE, else default) in AWS_CONFIG_FILE
/// or ~/.aws/config.
fn profile_setting(env: &impl Fn(&str) -> Option<String>, key: &str) -> Option<String> {
    let file =
        env("AWS_CONFIG_FILE").or_else(|| env("HOME").map(|h| format!("{h}/.aws/config")))?;
    let text = std::fs::read_to_string(file).ok()?;
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let wanted = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == wanted;
        } else if let Some((k, v)) = line.split_once('=') {
            if inside && k.trim() == key {
                return Some(v.trim().to_string()).filter(|v| !v.is_empty());
            }
        }
    }
    None
}

/// Splits "bucket/some/prefix" into the bucket and the prefix as a root.
fn bucket_and_root(rest: &str, url: &str) -> Result<(String, String)> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Config(format!(
            "{url}: no bucket in the URL; write it as scheme://bucket/prefix"
        )));
    }
    Ok((bucket.to_string(), format!("/{}", prefix.trim_matches('/'))))
}

pub fn open_source(url: &str, opts: &SourceOptions) -> Result<Arc<dyn Source>> {
    let (id, op) = operator(url, opts)?;
    Ok(Arc::new(OpendalSource::new(id, op)))
}

/// The OpenDAL operator for a source URL, and the source's stable id.
pub fn operator(url: &str, opts: &SourceOptions) -> Result<(String, Operator)> {
    // The HTTP transport is process-wide; installing it again is a no-op.
    opendal::install_default();
    let bad = |e: opendal::Error| Error::Config(format!("{url}: {e}"));
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s, r),
        None => ("file", url),
    };
    let op = match scheme {
        "file" => {
            let path = Path::new(rest);
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Config(format!(
                        "source {url} is a file; give the directory that holds the model"
                    )))
                }
                Err(e) => {
                    return Err(Error::Config(format!(
                        "source {url} cannot be read ({e}); check the path or mount the NAS first"
                    )))
                }
            }
            let abs = std::fs::canonicalize(path).map_err(|e| Error::io(url, e))?;
            let id = abs.display().to_string();
            let op = Operator::new(services::Fs::default().root(&id)).map_err(bad)?;
            return Ok((id, op));
        }
        "s3" => {
            let (bucket, root) = bucket_and_root(rest, url)?;
            let mut b = services::S3::default().bucket(&bucket).root(&root);
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            if let Some(e) = s3_endpoint(opts, env) {
                b = b.endpoint(&e);
            }
            b = b.region(&s3_region(opts, env));
            if opts.virtual_host_style {
                b = b.enable_virtual_host_style();
            }
            Operator::new(b).map_err(bad)?
        }
        "oss" => {
            let (bucket, root) = bucket_and_root(rest, url)?;
            let mut b = services::Oss::default().bucket(&bucket).root(&root);
            if let Some(e) = &opts.endpoint {
                b = b.endpoint(e);
            }
            Operator::new(b).map_err(bad)?
        }
        "gs" | "gcs" => {
            let (bucket, root) = bucket_and_root(rest, url)?;
            let mut b = services::Gcs::default().bucket(&bucket).root(&root);
            // STORAGE_EMULATOR_HOST, as Google's own client libraries read it:
            // an emulator, which takes no credentials.
            let emulator = std::env::var("STORAGE_EMULATOR_HOST")
                .ok()
                .filter(|h| !h.is_empty())
                .map(|h| {
                    if h.contains("://") {
                        h
                    } else {
                        format!("http://{h}")
                    }
                });
            if let Some(e) = opts.endpoint.clone().or(emulator.clone()) {
                b = b.endpoint(&e);
            }
            if emulator.is_some() {
                b = b.skip_signature().disable_vm_metadata().disable_config_load();
            }
            Operator::new(b).map_err(bad)?
        }
        "azblob" => {
            let (container, root) = bucket_and_root(rest, url)?;
            let mut b = services::Azblob::default()
                .container(&container)
                .root(&root);
            if let Some(e) = &opts.endpoint {
                b = b.endpoint(e);
            }
            if let Ok(account) = std::env::var("AZURE_STORAGE_ACCOUNT") {
                b = b.account_name(&account);
            }
            if let Ok(key) = std::env::var("AZURE_STORAGE_KEY") {
                b = b.account_key(&key);
            }
            Operator::new(b).map_err(bad)?
        }
        other => {
            return Err(Error::Config(format!(
                "{url}: unknown scheme '{other}://'; use a local path, s3://, oss://, gs:// or azblob://"
            )))
        }
    };
    let op = op
        .layer(
            TimeoutLayer::new()
                .with_timeout(opts.request_timeout)
                .with_io_timeout(opts.request_timeout),
        )
        .layer(
            RetryLayer::new()
                .with_jitter()
                .with_max_times(opts.retries)
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5)),
        );
    Ok((url.trim_end_matches('/').to_string(), op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_region_and_endpoint_follow_the_aws_tools() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(
            &config,
            "[default]\nregion = eu-west-1\n\n[profile minio]\nregion=us-west-2\nendpoint_url = http://10.0.0.5:9000\n",
        )
        .unwrap();
        let with = |vars: &[(&str, &str)]| {
            let mut v: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            v.push(("AWS_CONFIG_FILE".into(), config.display().to_string()));
            move |k: &str| v.iter().find(|(n, _)| n == k).map(|(_, x)| x.clone())
        };
        let o = SourceOptions::default();
        assert_eq!(s3_region(&o, with(&[])), "eu-west-1", "the default profile");
        assert_eq!(
            s3_region(&o, with(&[("AWS_PROFILE", "minio")])),
            "us-west-2"
        );
        assert_eq!(
            s3_region(&o, with(&[("AWS_DEFAULT_REGION", "ap-south-1")])),
            "ap-south-1"
        );
        assert_eq!(
            s3_region(
                &o,
                with(&[("AWS_REGION", "cn-north-1"), ("AWS_DEFAULT_REGION", "x")])
            ),
            "cn-north-1"
        );
        let flag = SourceOptions {
            region: Some("sa-east-1".into()),
            endpoint: Some("http://flag:9000".into()),
            ..Default::default()
        };
        assert_eq!(s3_region(&flag, with(&[("AWS_REGION", "x")])), "sa-east-1");
        assert_eq!(s3_region(&o, |_| None), "us-east-1");

        assert_eq!(s3_endpoint(&o, with(&[])), None);
        assert_eq!(
            s3_endpoint(&o, with(&[("AWS_PROFILE", "minio")])).as_deref(),
            Some("http://10.0.0.5:9000")
        );
        assert_eq!(
            s3_endpoint(&o, with(&[("AWS_ENDPOINT_URL", "http://a:1")])).as_deref(),
            Some("http://a:1")
        );
        assert_eq!(
            s3_endpoint(
                &o,
                with(&[
                    ("AWS_ENDPOINT_URL", "http://a:1"),
                    ("AWS_ENDPOINT_URL_S3", "http://s3:1")
                ])
            )
            .as_deref(),
            Some("http://s3:1")
        );
        assert_eq!(
            s3_endpoint(&flag, with(&[("AWS_ENDPOINT_URL", "http://a:1")])).as_deref(),
            Some("http://flag:9000")
        );
    }

    #[test]
    fn unknown_scheme_and_missing_bucket_are_clear() {
        let o = SourceOptions::default();
        let e = open_source("ftp://x/y", &o).err().unwrap().to_string();
        assert!(e.contains("unknown scheme 'ftp://'"), "{e}");
        let e = open_source("s3:///y", &o).err().unwrap().to_string();
        assert!(e.contains("no bucket"), "{e}");
        let e = open_source("/definitely/not/here", &o)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot be read"), "{e}");
    }
}
