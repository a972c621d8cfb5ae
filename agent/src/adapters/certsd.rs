//! containerd's registry host directory (`certs.d`, the CRI plugin's `registry.config_path`):
//! puts the local agent in front of a registry as a pull-only mirror and takes it out again.
//!
//! For each registry, `certs.d/<registry>/hosts.toml` becomes the file the core renders
//! ([`render_hosts_toml`]): the original's settings and hosts stay, after the mirror. What was
//! there is kept so [`CertsDir::restore`] puts it back exactly:
//!
//! - an existing hosts.toml is hard-linked to `hosts.toml.ragent-backup` (same inode: the same
//!   bytes, mode, owner and times; a copy when the file system refuses links) before ragent's
//!   file is renamed over it, and restored by renaming the backup back;
//! - without one, ragent's file records in its marker whether the directory existed, and
//!   restoring removes the file (and the directory ragent created, when empty).
//!
//! Every write is a temporary file in the same directory, fsynced, then renamed: containerd
//! (which re-reads hosts.toml on every pull) sees the old file or the new one, never half.
//! Installing again (an agent restart) rewrites only when the content would change and never
//! backs up a file ragent wrote. A hosts.toml ragent did not write is never removed or
//! overwritten without its backup in place.
use std::{
    fs, io,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use tracing::instrument;

use crate::core::sharing::{
    Original, SharingError, recognise_hosts_toml, render_hosts_toml, validate_registry,
};

pub const HOSTS_TOML: &str = "hosts.toml";
pub const BACKUP: &str = "hosts.toml.ragent-backup";
const TMP: &str = ".hosts.toml.ragent-tmp";

#[derive(Debug, thiserror::Error)]
pub enum CertsdError {
    #[error(
        "cannot {op} {path}: {source}; ragent needs write access to containerd's certs.d directory ([sharing] certs_dir)"
    )]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Sharing(#[from] SharingError),
    #[error(
        "{file} was not written by ragent and {backup} already holds another file; ragent will \
         not overwrite either: move one of them away, then restart the agent"
    )]
    BackupConflict { file: PathBuf, backup: PathBuf },
    #[error(
        "{backup} exists but {file} does not; restore it yourself (mv {backup} {file}) or delete \
         it, then restart the agent"
    )]
    OrphanBackup { file: PathBuf, backup: PathBuf },
    #[error(
        "{file} says ragent backed up the original to {backup}, but the backup is gone: the \
         original cannot be restored; write the hosts.toml you want (or delete ragent's) by hand"
    )]
    BackupMissing { file: PathBuf, backup: PathBuf },
    #[error(
        "{path} is not UTF-8 text, so it is no hosts.toml containerd can read; fix or remove it"
    )]
    NotText { path: PathBuf },
    #[error(
        "{root} does not exist, so containerd reads no hosts.toml from it: set [sharing] \
         certs_dir to the config_path of containerd's CRI registry config (and set that \
         config_path if it is empty)"
    )]
    NoCertsDir { root: PathBuf },
}

impl CertsdError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CertsdError::Io { .. } => "io",
            CertsdError::Sharing(e) => e.metric_label(),
            CertsdError::BackupConflict { .. } => "backup_conflict",
            CertsdError::OrphanBackup { .. } => "orphan_backup",
            CertsdError::BackupMissing { .. } => "backup_missing",
            CertsdError::NotText { .. } => "not_text",
            CertsdError::NoCertsDir { .. } => "no_certs_dir",
        }
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CertsdError {
    let path = path.to_path_buf();
    move |source| CertsdError::Io { op, path, source }
}

/// What [`CertsDir::install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// Wrote ragent's file; `original` says what was there (and how restore treats it).
    Written { original: Original },
    /// ragent's file was there, now with new content (e.g. another mirror port).
    Updated,
    /// ragent's file was there with the same content: nothing written.
    Unchanged,
}

/// What [`CertsDir::restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The original hosts.toml is back.
    Original,
    /// ragent's file is gone (there was none before); `removed_dir` when the directory went too.
    Removed { removed_dir: bool },
    /// No hosts.toml: nothing to do.
    Absent,
    /// The hosts.toml there is not ragent's: left alone.
    NotOurs,
}

/// A `certs.d` directory and the mirror URL ragent writes into it.
#[derive(Debug, Clone)]
pub struct CertsDir {
    root: PathBuf,
    mirror: String,
}

impl CertsDir {
    /// `root` is containerd's `config_path` (e.g. `/etc/containerd/certs.d`); `mirror` the URL
    /// containerd reaches the local agent at (`http://127.0.0.1:9465`).
    pub fn new(root: impl Into<PathBuf>, mirror: impl Into<String>) -> CertsDir {
        CertsDir {
            root: root.into(),
            mirror: mirror.into(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn paths(&self, registry: &str) -> Result<(PathBuf, PathBuf, PathBuf), CertsdError> {
        validate_registry(registry)?;
        let dir = self.root.join(registry);
        Ok((dir.join(HOSTS_TOML), dir.join(BACKUP), dir))
    }

    /// Makes containerd ask the local agent first for `registry`'s blobs and manifests.
    #[instrument(level = "debug", skip(self), fields(root = %self.root.display()))]
    pub fn install(&self, registry: &str) -> Result<Installed, CertsdError> {
        let (file, backup, dir) = self.paths(registry)?;
        // A missing root means containerd is not configured to read it: writing there would
        // change nothing and say nothing.
        if !self.root.is_dir() {
            return Err(CertsdError::NoCertsDir {
                root: self.root.clone(),
            });
        }
        match read_opt(&file)? {
            Some(current) => {
                let text = as_text(&file, &current)?;
                if let Some(original) = recognise_hosts_toml(text) {
                    let orig_text = match original {
                        Original::Backup => {
                            let b =
                                read_opt(&backup)?.ok_or_else(|| CertsdError::BackupMissing {
                                    file: file.clone(),
                                    backup: backup.clone(),
                                })?;
                            Some(as_text(&backup, &b)?.to_string())
                        }
                        Original::NoFile | Original::NoDir => None,
                    };
                    let new =
                        render_hosts_toml(registry, &self.mirror, orig_text.as_deref(), original)?;
                    if new.as_bytes() == current.as_slice() {
                        return Ok(Installed::Unchanged);
                    }
                    write_atomic(&dir, &file, new.as_bytes())?;
                    return Ok(Installed::Updated);
                }
                // Someone else's file. A backup identical to it is what an interrupted install
                // left (the link is made before ragent's file replaces the original).
                if let Some(b) = read_opt(&backup)?
                    && b != current
                {
                    return Err(CertsdError::BackupConflict { file, backup });
                }
                // Render first: an original ragent cannot merge with is left untouched.
                let new = render_hosts_toml(registry, &self.mirror, Some(text), Original::Backup)?;
                keep_backup(&dir, &file, &backup, &current)?;
                write_atomic(&dir, &file, new.as_bytes())?;
                Ok(Installed::Written {
                    original: Original::Backup,
                })
            }
            None => {
                if backup.exists() {
                    return Err(CertsdError::OrphanBackup { file, backup });
                }
                let original = if dir.is_dir() {
                    Original::NoFile
                } else {
                    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
                    Original::NoDir
                };
                let new = render_hosts_toml(registry, &self.mirror, None, original)?;
                write_atomic(&dir, &file, new.as_bytes())?;
                Ok(Installed::Written { original })
            }
        }
    }

    /// Puts back what was there before [`CertsDir::install`]: the original file (same bytes,
    /// same inode when it could be linked), or nothing (and no directory, if ragent made it).
    #[instrument(level = "debug", skip(self), fields(root = %self.root.display()))]
    pub fn restore(&self, registry: &str) -> Result<Restored, CertsdError> {
        let (file, backup, dir) = self.paths(registry)?;
        let Some(current) = read_opt(&file)? else {
            return Ok(Restored::Absent);
        };
        let Some(original) = recognise_hosts_toml(&String::from_utf8_lossy(&current)) else {
            return Ok(Restored::NotOurs);
        };
        match original {
            Original::Backup => {
                if !backup.exists() {
                    return Err(CertsdError::BackupMissing { file, backup });
                }
                fs::rename(&backup, &file).map_err(io_err("restore", &file))?;
                sync_dir(&dir)?;
                Ok(Restored::Original)
            }
            Original::NoFile | Original::NoDir => {
                fs::remove_file(&file).map_err(io_err("remove", &file))?;
                sync_dir(&dir)?;
                // Only an empty directory goes: certificates someone put there since stay.
                let removed_dir = original == Original::NoDir && fs::remove_dir(&dir).is_ok();
                Ok(Restored::Removed { removed_dir })
            }
        }
    }

    /// The registries whose hosts.toml ragent wrote.
    pub fn managed(&self) -> Result<Vec<String>, CertsdError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.root))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let file = entry.path().join(HOSTS_TOML);
            if let Some(text) = read_opt(&file)?
                && recognise_hosts_toml(&String::from_utf8_lossy(&text)).is_some()
            {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Installs the mirror for `registries` and restores every other registry ragent had
    /// written for (one taken out of the config since the last start). One result per
    /// registry: a registry that fails does not stop the others.
    pub fn sync(&self, registries: &[String]) -> Vec<(String, Result<Change, CertsdError>)> {
        let mut out: Vec<(String, Result<Change, CertsdError>)> = registries
            .iter()
            .map(|r| (r.clone(), self.install(r).map(Change::Installed)))
            .collect();
        match self.managed() {
            Ok(managed) => {
                for r in managed.into_iter().filter(|r| !registries.contains(r)) {
                    let res = self.restore(&r).map(Change::Restored);
                    out.push((r, res));
                }
            }
            Err(e) => out.push((String::new(), Err(e))),
        }
        out
    }

    /// Restores every registry ragent wrote for (sharing turned off).
    pub fn restore_all(&self) -> Vec<(String, Result<Restored, CertsdError>)> {
        match self.managed() {
            Ok(m) => m
                .into_iter()
                .map(|r| {
                    let res = self.restore(&r);
                    (r, res)
                })
                .collect(),
            Err(e) => vec![(String::new(), Err(e))],
        }
    }
}

/// One registry's change in [`CertsDir::sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Installed(Installed),
    Restored(Restored),
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, CertsdError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn as_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, CertsdError> {
    std::str::from_utf8(bytes).map_err(|_| CertsdError::NotText {
        path: path.to_path_buf(),
    })
}

/// `backup` becomes the original `file`: a hard link (the same inode), or, where the file
/// system has no links, a copy of its bytes and mode. Done when it already is (an interrupted
/// install).
fn keep_backup(dir: &Path, file: &Path, backup: &Path, bytes: &[u8]) -> Result<(), CertsdError> {
    if backup.exists() {
        return Ok(());
    }
    match fs::hard_link(file, backup) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(_) => {
            let mode = fs::metadata(file)
                .map_err(io_err("stat", file))?
                .permissions()
                .mode();
            write_atomic_mode(dir, backup, bytes, mode)
        }
    }
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), CertsdError> {
    write_atomic_mode(dir, path, bytes, 0o644)
}

/// Writes a temporary file in `dir`, fsyncs it, renames it to `path`, fsyncs `dir`.
fn write_atomic_mode(dir: &Path, path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertsdError> {
    let tmp = dir.join(format!("{TMP}-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("replace", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> Result<(), CertsdError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const MIRROR: &str = "http://127.0.0.1:9465";

    /// A directory under the system temp dir, removed on drop.
    struct Temp(PathBuf);

    impl Temp {
        fn new(name: &str) -> Temp {
            let d =
                std::env::temp_dir().join(format!("ragent-certsd-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Temp(d)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Every file under `dir` with its bytes and mode (and nothing else), for before/after.
    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = fs::metadata(&p).unwrap();
                if m.is_dir() {
                    out.push((p.clone(), Vec::new(), m.mode()));
                    stack.push(p);
                } else {
                    out.push((p.clone(), fs::read(&p).unwrap(), m.mode()));
                }
            }
        }
        out.sort();
        out
    }

    const ORIGINAL: &str = "server = \"http://127.0.0.1:5055\"\n\n[host.\"http://127.0.0.1:5055\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n";

    #[test]
    fn an_existing_file_is_backed_up_merged_and_restored_byte_for_byte() {
        let t = Temp::new("existing");
        let dir = t.0.join("127.0.0.1:5055");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("ca.crt"), "cert").unwrap();
        let file = dir.join(HOSTS_TOML);
        fs::write(&file, ORIGINAL).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let ino = fs::metadata(&file).unwrap().ino();
        let before = snapshot(&t.0);

        let c = CertsDir::new(&t.0, MIRROR);
        assert_eq!(
            c.install("127.0.0.1:5055").unwrap(),
            Installed::Written {
                original: Original::Backup
            }
        );
        let written = fs::read_to_string(&file).unwrap();
        assert_eq!(recognise_hosts_toml(&written), Some(Original::Backup));
        assert!(
            written.find(MIRROR).unwrap()
                < written.find("[host.\"http://127.0.0.1:5055\"]").unwrap()
        );
        assert_eq!(fs::read_to_string(dir.join(BACKUP)).unwrap(), ORIGINAL);
        assert_eq!(c.managed().unwrap(), vec!["127.0.0.1:5055"]);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 3);

        assert_eq!(c.restore("127.0.0.1:5055").unwrap(), Restored::Original);
        assert_eq!(snapshot(&t.0), before);
        assert_eq!(
            fs::metadata(&file).unwrap().ino(),
            ino,
            "the same file, not a copy"
        );
        assert!(c.managed().unwrap().is_empty());
        // Restoring again changes nothing.
        assert_eq!(c.restore("127.0.0.1:5055").unwrap(), Restored::NotOurs);
        assert_eq!(snapshot(&t.0), before);
    }

    #[test]
    fn without_a_file_restore_removes_what_ragent_created() {
        let t = Temp::new("fresh");
        let before = snapshot(&t.0);
        let c = CertsDir::new(&t.0, MIRROR);
        assert_eq!(
            c.install("docker.io").unwrap(),
            Installed::Written {
                original: Original::NoDir
            }
        );
        let text = fs::read_to_string(t.0.join("docker.io").join(HOSTS_TOML)).unwrap();
        assert!(
            text.contains("server = \"https://registry-1.docker.io\""),
            "{text}"
        );
        assert_eq!(
            c.restore("docker.io").unwrap(),
            Restored::Removed { removed_dir: true }
        );
        assert_eq!(snapshot(&t.0), before);

        // A directory that existed (with a certificate) stays, without hosts.toml.
        let dir = t.0.join("ghcr.io");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("client.pem"), "x").unwrap();
        let before = snapshot(&t.0);
        assert_eq!(
            c.install("ghcr.io").unwrap(),
            Installed::Written {
                original: Original::NoFile
            }
        );
        assert_eq!(
            c.restore("ghcr.io").unwrap(),
            Restored::Removed { removed_dir: false }
        );
        assert_eq!(snapshot(&t.0), before);
    }

    #[test]
    fn a_created_directory_that_gained_files_is_kept() {
        let t = Temp::new("gained");
        let c = CertsDir::new(&t.0, MIRROR);
        c.install("quay.io").unwrap();
        fs::write(t.0.join("quay.io").join("ca.crt"), "x").unwrap();
        assert_eq!(
            c.restore("quay.io").unwrap(),
            Restored::Removed { removed_dir: false }
        );
        assert!(t.0.join("quay.io").join("ca.crt").exists());
        assert!(!t.0.join("quay.io").join(HOSTS_TOML).exists());
    }

    #[test]
    fn installing_again_is_idempotent_and_follows_the_mirror() {
        let t = Temp::new("again");
        let dir = t.0.join("r.example");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(HOSTS_TOML), ORIGINAL).unwrap();
        let c = CertsDir::new(&t.0, MIRROR);
        c.install("r.example").unwrap();
        let after_first = snapshot(&t.0);
        // An agent restart: nothing written, the backup is still the original.
        assert_eq!(c.install("r.example").unwrap(), Installed::Unchanged);
        assert_eq!(snapshot(&t.0), after_first);
        // Another port: rewritten from the backup, not from ragent's own file.
        let c2 = CertsDir::new(&t.0, "http://127.0.0.1:19465");
        assert_eq!(c2.install("r.example").unwrap(), Installed::Updated);
        let text = fs::read_to_string(dir.join(HOSTS_TOML)).unwrap();
        assert!(
            text.contains("127.0.0.1:19465") && !text.contains("127.0.0.1:9465"),
            "{text}"
        );
        assert_eq!(text.matches("ragent-managed").count(), 1, "{text}");
        assert_eq!(fs::read_to_string(dir.join(BACKUP)).unwrap(), ORIGINAL);
        assert_eq!(c2.restore("r.example").unwrap(), Restored::Original);
        assert_eq!(fs::read_to_string(dir.join(HOSTS_TOML)).unwrap(), ORIGINAL);
    }

    #[test]
    fn an_interrupted_install_resumes() {
        // The link was made, then the agent died before its file replaced the original.
        let t = Temp::new("interrupted");
        let dir = t.0.join("r.example");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(HOSTS_TOML), ORIGINAL).unwrap();
        fs::hard_link(dir.join(HOSTS_TOML), dir.join(BACKUP)).unwrap();
        let c = CertsDir::new(&t.0, MIRROR);
        assert_eq!(
            c.install("r.example").unwrap(),
            Installed::Written {
                original: Original::Backup
            }
        );
        assert_eq!(c.restore("r.example").unwrap(), Restored::Original);
        assert_eq!(fs::read_to_string(dir.join(HOSTS_TOML)).unwrap(), ORIGINAL);
        assert!(!dir.join(BACKUP).exists());
    }

    #[test]
    fn someone_elses_files_are_never_lost() {
        let t = Temp::new("conflict");
        let dir = t.0.join("r.example");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(HOSTS_TOML), ORIGINAL).unwrap();
        fs::write(dir.join(BACKUP), "server = \"https://elsewhere\"\n").unwrap();
        let before = snapshot(&t.0);
        let c = CertsDir::new(&t.0, MIRROR);
        let e = c.install("r.example").unwrap_err();
        assert_eq!(e.metric_label(), "backup_conflict", "{e}");
        assert!(e.to_string().contains("move one of them away"), "{e}");
        assert_eq!(snapshot(&t.0), before);
        // restore leaves a file ragent did not write alone.
        assert_eq!(c.restore("r.example").unwrap(), Restored::NotOurs);
        assert_eq!(snapshot(&t.0), before);

        // A backup without a hosts.toml: refused, untouched.
        fs::remove_file(dir.join(HOSTS_TOML)).unwrap();
        let before = snapshot(&t.0);
        assert_eq!(
            c.install("r.example").unwrap_err().metric_label(),
            "orphan_backup"
        );
        assert_eq!(snapshot(&t.0), before);

        // An original ragent cannot merge with: refused, untouched.
        let d2 = t.0.join("bad.example");
        fs::create_dir_all(&d2).unwrap();
        fs::write(d2.join(HOSTS_TOML), "server = \n").unwrap();
        let before = snapshot(&t.0);
        assert_eq!(
            c.install("bad.example").unwrap_err().metric_label(),
            "hosts_toml_invalid"
        );
        assert_eq!(snapshot(&t.0), before);
    }

    #[test]
    fn a_lost_backup_is_reported_not_papered_over() {
        let t = Temp::new("lost");
        let dir = t.0.join("r.example");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(HOSTS_TOML), ORIGINAL).unwrap();
        let c = CertsDir::new(&t.0, MIRROR);
        c.install("r.example").unwrap();
        fs::remove_file(dir.join(BACKUP)).unwrap();
        let e = c.restore("r.example").unwrap_err();
        assert_eq!(e.metric_label(), "backup_missing");
        assert_eq!(
            c.install("r.example").unwrap_err().metric_label(),
            "backup_missing"
        );
        // ragent's file stays (removing it would leave containerd with no config at all).
        assert!(dir.join(HOSTS_TOML).exists());
    }

    #[test]
    fn registry_names_cannot_escape_the_directory() {
        let t = Temp::new("escape");
        let c = CertsDir::new(t.0.join("certs.d"), MIRROR);
        for bad in ["..", "../x", "a/b", ""] {
            let e = c.install(bad).unwrap_err();
            assert_eq!(e.metric_label(), "invalid_registry", "{bad:?}: {e}");
        }
        assert!(!t.0.join("x").exists() && !t.0.join("certs.d").exists());
        // A certs.d that does not exist is not created: containerd would not read it.
        let e = c.install("docker.io").unwrap_err();
        assert_eq!(e.metric_label(), "no_certs_dir");
        assert!(e.to_string().contains("config_path"), "{e}");
        assert!(!t.0.join("certs.d").exists());
    }

    #[test]
    fn sync_installs_the_list_and_restores_what_left_it() {
        let t = Temp::new("sync");
        let c = CertsDir::new(&t.0, MIRROR);
        let dir = t.0.join("r.example");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(HOSTS_TOML), ORIGINAL).unwrap();
        let before = snapshot(&t.0);
        let list = vec!["docker.io".to_string(), "r.example".to_string()];
        let got = c.sync(&list);
        assert!(got.iter().all(|(_, r)| r.is_ok()), "{got:?}");
        assert_eq!(c.managed().unwrap(), list);
        // r.example left the config: restored, docker.io unchanged.
        let got = c.sync(&list[..1]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(
            got[0].1,
            Ok(Change::Installed(Installed::Unchanged))
        ));
        assert!(matches!(got[1].1, Ok(Change::Restored(Restored::Original))));
        let got = c.restore_all();
        assert_eq!(got.len(), 1);
        assert_eq!(snapshot(&t.0), before);
        // A missing certs.d: nothing managed.
        assert!(
            CertsDir::new(t.0.join("none"), MIRROR)
                .managed()
                .unwrap()
                .is_empty()
        );
    }
}
