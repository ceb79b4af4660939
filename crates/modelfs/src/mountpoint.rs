//! Everything about the directory we mount on: checks before mounting, the
//! kernel's view of mounts, readahead, and taking a mount down.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracing::warn;

/// Mount points as the kernel lists them for this process.
fn mounts() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let mp = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?;
            Some((PathBuf::from(unescape(mp)), fstype.to_string()))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filesystem type mounted exactly at `path`, if any.
pub fn mounted_at(path: &Path) -> Option<String> {
    mounts()
        .into_iter()
        .rev()
        .find(|(mp, _)| mp == path)
        .map(|(_, t)| t)
}

/// The absolute path as the kernel's mount table writes it (no trailing
/// slash, no `.` components).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).with_context(|| path.display().to_string())?;
    Ok(abs.components().collect())
}

/// Refuses a mount point that is missing, not a directory, not empty, or
/// already mounted; returns its absolute path. A modelfs mount whose daemon
/// died (kill -9, OOM) is detached first, so a restart needs no manual step.
pub fn check(mountpoint: &Path) -> Result<PathBuf> {
    let abs = absolute(mountpoint)?;
    // statfs always asks the daemon; stat may be answered from cached attributes.
    if mounted_at(&abs).as_deref() == Some(FSTYPE)
        && nix::sys::statfs::statfs(&abs).err() == Some(nix::errno::Errno::ENOTCONN)
    {
        warn!(mountpoint = %abs.display(), "detaching the mount of a modelfs daemon that is gone");
        lazy_unmount(&abs)?;
    }
    if let Some(fstype) = mounted_at(&abs) {
        bail!(
            "mount point {} is already mounted ({fstype}); run `modelfs unmount {}` or pick another directory",
            abs.display(),
            abs.display()
        );
    }
    let meta = match std::fs::metadata(&abs) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "mount point {} does not exist; create it with `mkdir -p {}`",
            abs.display(),
            abs.display()
        ),
        Err(e) => bail!("mount point {}: {e}", abs.display()),
    };
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", abs.display());
    }
    let mut entries =
        std::fs::read_dir(&abs).with_context(|| format!("mount point {}", abs.display()))?;
    if entries.next().is_some() {
        bail!(
            "mount point {} is not empty; mount on an empty directory so nothing is hidden",
            abs.display()
        );
    }
    Ok(abs)
}

/// Raises the mount's readahead so the kernel asks for large reads and many
/// of them at once, instead of the 128 KiB default.
pub fn set_readahead(mountpoint: &Path, kib: u64) -> Result<()> {
    let dev = std::fs::metadata(mountpoint)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let p = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    std::fs::write(&p, kib.to_string()).with_context(|| format!("writing {p}"))?;
    Ok(())
}

/// The filesystem type of our mounts, so the mount table tells them apart
/// from any other FUSE file system.
pub const FSTYPE: &str = "fuse.modelfs";

/// Mounts a FUSE file system of type `fuse.modelfs` at `mountpoint` and
/// returns the `/dev/fuse` fd that serves it. fuser's own mount always says
/// plain `fuse`, so we make the mount(2) call ourselves, with the options
/// fuser would pass.
pub fn mount_fuse(mountpoint: &Path, source: &str) -> Result<OwnedFd> {
    use nix::mount::MsFlags;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .context("opening /dev/fuse (load the fuse module: `modprobe fuse`)")?;
    let data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},allow_other",
        dev.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOATIME;
    nix::mount::mount(
        Some(source),
        mountpoint,
        Some(FSTYPE),
        flags,
        Some(data.as_str()),
    )
    .with_context(|| {
        format!(
            "mounting on {} (modelfs mounts need root or CAP_SYS_ADMIN)",
            mountpoint.display()
        )
    })?;
    Ok(dev.into())
}

/// Detaches the mount even while files are open on it.
pub fn lazy_unmount(mountpoint: &Path) -> Result<()> {
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting {}", mountpoint.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(super::unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
    }

    #[test]
    fn absolute_paths_match_the_mount_table() {
        let p = super::absolute(std::path::Path::new("/mnt/./models/")).unwrap();
        assert_eq!(p, std::path::PathBuf::from("/mnt/models"));
    }
}
