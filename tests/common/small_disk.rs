//! A small tmpfs mounted over a test's directory (needs root): a disk that
//! fills up, or is remounted read-only, under a running process.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A tmpfs over a directory, unmounted (lazily: a process may still hold
/// files there) when dropped.
pub struct SmallDisk(PathBuf);

/// What [`SmallDisk::fill`] wrote: the disk is full while it exists.
pub struct Filler(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`mount`'s syntax: `512k`, `8m`) over
    /// `dir`, which must exist.
    pub fn mount_over(dir: &Path, size: &str) -> SmallDisk {
        // SAFETY: plain getter.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(
            uid, 0,
            "this test mounts a tmpfs and needs root (CI runs as root)"
        );
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir,
        );
        SmallDisk(dir.to_path_buf())
    }

    /// An ext4 file system of `size` bytes (a loop device over a file
    /// next to `dir`) mounted over `dir` with `errors=remount-ro`: the kernel
    /// turns it read-only under running processes on an error
    /// ([`SmallDisk::fail_read_only`]), as a disk going bad does. (A tmpfs
    /// cannot be remounted read-only while a process holds a file open for
    /// writing: `mount` refuses, busy.)
    pub fn ext4_over(dir: &Path, size: u64) -> SmallDisk {
        // SAFETY: plain getter.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(
            uid, 0,
            "this test mounts a file system and needs root (CI runs as root)"
        );
        let image = dir.with_extension("ext4");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("ext4 image");
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .output()
            .expect("mkfs.ext4 (e2fsprogs)");
        assert!(out.status.success(), "mkfs.ext4: {out:?}");
        mount(
            &["-o", "loop,errors=remount-ro", image.to_str().unwrap()],
            dir,
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Makes the ext4 file system of [`SmallDisk::ext4_over`] fail as a
    /// bad disk does: the kernel remounts it read-only at once, open files
    /// included, until it is unmounted and checked.
    pub fn fail_read_only(&self) {
        let dev = std::process::Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.0)
            .output()
            .expect("findmnt");
        let dev = String::from_utf8_lossy(&dev.stdout).trim().to_string();
        let name = dev.rsplit('/').next().unwrap_or_default().to_string();
        std::fs::write(
            format!("/sys/fs/ext4/{name}/trigger_fs_error"),
            "test: disk gone bad\n",
        )
        .unwrap_or_else(|e| panic!("trigger_fs_error on {dev}: {e}"));
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn grow(&self, size: &str) {
        mount(&["-o", &format!("remount,size={size}")], &self.0);
    }

    /// Fills every free byte with one file, as a log filling `/var` does.
    /// Deleting it ([`Filler::free`]) gives the room back.
    pub fn fill(&self) -> Filler {
        let path = self.0.join("filler.log");
        let mut file = std::fs::File::create(&path).expect("filler file");
        let chunk = vec![b'x'; 4096];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // Whatever a partial page left.
        while file.write(b"x").is_ok_and(|n| n > 0) {}
        Filler(path)
    }

    /// Free bytes left on the disk.
    pub fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path and an out-struct of the right type.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs {}", self.0.display());
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// `mount -o remount,ro`: every write on it fails with EROFS from now
    /// on (files open for writing make the kernel refuse: the error says so).
    pub fn remount_read_only(&self) -> Result<(), String> {
        try_mount(&["-o", "remount,ro"], &self.0)
    }

    pub fn remount_read_write(&self) {
        mount(&["-o", "remount,rw"], &self.0);
    }
}

impl Filler {
    /// Deletes the filler: the room is back.
    pub fn free(self) {
        std::fs::remove_file(&self.0).expect("remove the filler file");
    }
}

fn mount(args: &[&str], at: &Path) {
    if let Err(e) = try_mount(args, at) {
        panic!("{e}");
    }
}

fn try_mount(args: &[&str], at: &Path) -> Result<(), String> {
    let out = std::process::Command::new("mount")
        .args(args)
        .arg(at)
        .output()
        .expect("mount");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount {args:?} {}: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
        // The image of `ext4_over`, if any (a loop device still holding it
        // keeps it until it lets go).
        let _ = std::fs::remove_file(self.0.with_extension("ext4"));
    }
}
