//! Host integration: the fstab helper (`mount.fuse.modelfs`, `mount.modelfs`)
//! that mount(8) runs for `fuse.modelfs` lines, and systemd readiness
//! (`Type=notify`).

use std::ffi::OsString;

use anyhow::{anyhow, bail, Result};

/// Names under which this binary is the mount helper: mount(8) runs
/// `/sbin/mount.fuse.modelfs` for type `fuse.modelfs`, `/sbin/mount.modelfs`
/// for type `modelfs`.
const HELPER_NAMES: [&str; 2] = ["mount.fuse.modelfs", "mount.modelfs"];

/// Mount options that are mount(8)'s, fstab's or systemd's business, or that
/// modelfs always applies (read-only, nosuid, nodev, allow_other).
const IGNORED: [&str; 26] = [
    "defaults",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "ro",
    "rw",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "async",
    "allow_other",
    "default_permissions",
    "comment",
    "fsname",
];

/// If this binary was started as the mount helper, the `modelfs mount`
/// command line its fstab options stand for.
pub fn helper_argv(args: &[OsString]) -> Option<Result<Vec<String>>> {
    let name = std::path::Path::new(args.first()?).file_name()?.to_str()?;
    HELPER_NAMES
        .contains(&name)
        .then(|| fstab_argv(name, &args[1..]))
}

/// `SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`, as mount(8) calls helpers.
fn fstab_argv(name: &str, args: &[OsString]) -> Result<Vec<String>> {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{name}: {a:?} is not UTF-8"))
        })
        .collect::<Result<_>>()?;
    let mut positional = vec![];
    let mut options = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => options.extend(
                it.next()
                    .ok_or_else(|| anyhow!("{name}: -o needs options"))?
                    .split(',')
                    .map(str::to_string),
            ),
            "-t" | "-N" => {
                it.next();
            }
            "-s" | "-f" | "-n" | "-v" => {}
            o if o.starts_with('-') => bail!("{name}: unknown argument {o}"),
            p => positional.push(p.to_string()),
        }
    }
    let [spec, dir] = positional.as_slice() else {
        bail!("{name}: usage: {name} SOURCE MOUNTPOINT [-o cache_size=20GiB,endpoint=...]");
    };
    let mut argv = vec![
        "modelfs".to_string(),
        "mount".into(),
        spec.clone(),
        dir.clone(),
    ];
    for o in options.iter().filter(|o| !o.is_empty()) {
        let (key, value) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o.as_str(), None),
        };
        if IGNORED.contains(&key) || key.starts_with("x-") {
            continue;
        }
        if key == "foreground" {
            bail!("{name}: option foreground: mount(8) waits for the helper; remove it");
        }
        let flag = key.replace('_', "-");
        argv.push(match value {
            Some(v) => format!("--{flag}={v}"),
            None => format!("--{flag}"),
        });
    }
    Ok(argv)
}

/// Tells systemd (`Type=notify`) that the mount is ready; nothing without
/// NOTIFY_SOCKET.
pub fn notify_ready(status: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Result<Vec<String>> {
        let v: Vec<OsString> = s.iter().map(OsString::from).collect();
        helper_argv(&v).unwrap()
    }

    #[test]
    fn fstab_options_map_to_flags() {
        let a = argv(&[
            "/sbin/mount.fuse.modelfs",
            "s3://models/Qwen3-8B",
            "/mnt/qwen",
            "-o",
            "rw,_netdev,cache_size=20GiB,endpoint=http://10.0.0.5:9000,x-systemd.automount,virtual_host_style",
            "-n",
        ])
        .unwrap();
        assert_eq!(
            a,
            [
                "modelfs",
                "mount",
                "s3://models/Qwen3-8B",
                "/mnt/qwen",
                "--cache-size=20GiB",
                "--endpoint=http://10.0.0.5:9000",
                "--virtual-host-style"
            ]
        );
        assert!(argv(&["mount.modelfs", "/a"]).is_err());
        assert!(argv(&["mount.modelfs", "/a", "/b", "-o", "foreground"]).is_err());
        let none: Vec<OsString> = vec!["modelfs".into(), "stat".into()];
        assert!(helper_argv(&none).is_none());
    }
}
