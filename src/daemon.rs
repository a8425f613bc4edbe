//! Detaching into the background (`Daemon` section), before any thread exists.
//!
//! Everything that can fail is checked while the terminal is still attached, so the
//! operator sees why the relay did not start: the pidfile must not name a live process
//! and must be writable, the user and group must exist. The pidfile is created and
//! locked before detaching (the lock passes to the daemon), the process id is written
//! after, privileges are dropped last (supplementary groups, then group, then user).
//! [`Pidfile`] removes the file when dropped at exit; when the dropped-to user may not
//! remove it (a root-owned directory such as `/run`), it empties the file through the
//! descriptor it opened as root, so the file no longer names a process.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::kill;
use nix::unistd::{Gid, Group, Pid, Uid, User};

use crate::config::DaemonConfig;

/// Why the relay could not detach.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another process owns the pidfile.
    #[error("pidfile {path} names running process {pid}; is mikkoo already running?")]
    AlreadyRunning {
        /// The pidfile.
        path: PathBuf,
        /// The live process.
        pid: i32,
    },
    /// The pidfile could not be written.
    #[error("cannot use pidfile {path}: {reason}")]
    Pidfile {
        /// The pidfile.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The configured user or group does not exist or cannot be switched to.
    #[error("cannot run as {what}: {reason}")]
    Identity {
        /// `user X` or `group Y`.
        what: String,
        /// What failed.
        reason: String,
    },
    /// `daemon(3)` failed.
    #[error("cannot detach: {0}")]
    Detach(nix::Error),
}

/// The locked pidfile of the running daemon; removed when dropped.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    locked_file: Flock<File>,
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let Err(remove_error) = std::fs::remove_file(&self.path) else {
            return;
        };
        let file: &mut File = &mut self.locked_file;
        match file.set_len(0) {
            Ok(()) => tracing::info!(
                pidfile = %self.path.display(),
                "pidfile emptied, not removed ({remove_error}); give the daemon's user write access to its directory to have it removed"
            ),
            Err(truncate_error) => tracing::warn!(
                pidfile = %self.path.display(),
                "pidfile left behind: cannot remove it ({remove_error}) nor empty it ({truncate_error})"
            ),
        }
    }
}

/// Who to become after detaching.
struct Identity {
    user: Option<User>,
    group: Option<Group>,
}

/// What is checked and held before detaching: who to become, and the locked pidfile
/// (removed again if the relay gives up before detaching).
pub struct Detachable {
    identity: Identity,
    pidfile: Option<(Flock<File>, PathBuf)>,
}

impl Drop for Detachable {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.pidfile {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Checks the user and group and locks the pidfile (refusing one that names a live
/// process), while the terminal is still attached. Done before anything else claims a
/// resource, so a second instance is told it is one.
pub fn prepare(config: &DaemonConfig) -> Result<Detachable, DaemonError> {
    let identity = resolve_identity(config)?;
    let pidfile = match &config.pidfile {
        Some(path) => {
            // Detaching changes directory to `/`: a relative path must be resolved now,
            // or the pidfile would be removed at the wrong place.
            let path = std::path::absolute(path).map_err(|e| DaemonError::Pidfile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Some((lock_pidfile(&path)?, path))
        }
        None => None,
    };
    Ok(Detachable { identity, pidfile })
}

impl Detachable {
    /// Detaches the process: on success the caller is the daemon (the launching process
    /// has exited 0) and holds the pidfile, if one is configured.
    pub fn detach(mut self) -> Result<Option<Pidfile>, DaemonError> {
        nix::unistd::daemon(false, false).map_err(DaemonError::Detach)?;
        let pidfile = match self.pidfile.take() {
            Some((lock, path)) => Some(write_pid(lock, &path)?),
            None => None,
        };
        drop_privileges(&self.identity)?;
        Ok(pidfile)
    }
}

fn resolve_identity(config: &DaemonConfig) -> Result<Identity, DaemonError> {
    let identity_error = |what: String, reason: String| DaemonError::Identity { what, reason };
    let user = match &config.user {
        Some(name) => Some(
            User::from_name(name)
                .map_err(|e| identity_error(format!("user {name}"), e.to_string()))?
                .ok_or_else(|| identity_error(format!("user {name}"), "no such user".into()))?,
        ),
        None => None,
    };
    let group = match &config.group {
        Some(name) => Some(
            Group::from_name(name)
                .map_err(|e| identity_error(format!("group {name}"), e.to_string()))?
                .ok_or_else(|| identity_error(format!("group {name}"), "no such group".into()))?,
        ),
        None => None,
    };
    let switching = user.as_ref().is_some_and(|u| u.uid != Uid::current())
        || group.as_ref().is_some_and(|g| g.gid != Gid::current());
    if switching && !Uid::effective().is_root() {
        return Err(identity_error(
            config
                .user
                .clone()
                .map_or_else(|| "the configured group".into(), |u| format!("user {u}")),
            "only root can switch users; start as root or remove Daemon.user/group".into(),
        ));
    }
    Ok(Identity { user, group })
}

/// Opens and locks the pidfile, refusing one that names a live process.
fn lock_pidfile(path: &Path) -> Result<Flock<File>, DaemonError> {
    let pidfile_error = |reason: String| DaemonError::Pidfile {
        path: path.to_owned(),
        reason,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| pidfile_error(e.to_string()))?;
    let mut existing = String::new();
    let _ = file.read_to_string(&mut existing);
    if let Ok(pid) = existing.trim().parse::<i32>()
        && pid > 0
        && kill(Pid::from_raw(pid), None).is_ok()
    {
        return Err(DaemonError::AlreadyRunning {
            path: path.to_owned(),
            pid,
        });
    }
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        pidfile_error(format!(
            "locked by another process ({errno}); is mikkoo already running?"
        ))
    })
}

fn write_pid(mut lock: Flock<File>, path: &Path) -> Result<Pidfile, DaemonError> {
    let pidfile_error = |e: std::io::Error| DaemonError::Pidfile {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let file: &mut File = &mut lock;
    file.set_len(0).map_err(pidfile_error)?;
    file.rewind().map_err(pidfile_error)?;
    writeln!(file, "{}", std::process::id()).map_err(pidfile_error)?;
    file.sync_all().map_err(pidfile_error)?;
    Ok(Pidfile {
        path: path.to_owned(),
        locked_file: lock,
    })
}

fn drop_privileges(identity: &Identity) -> Result<(), DaemonError> {
    // Not root: `resolve_identity` made sure the configured user and group are already
    // ours, so there is nothing to switch (and setgroups would be refused).
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let gid = identity
        .group
        .as_ref()
        .map(|g| g.gid)
        .or_else(|| identity.user.as_ref().map(|u| u.gid));
    let identity_error = |what: &str, e: nix::Error| DaemonError::Identity {
        what: what.to_owned(),
        reason: e.to_string(),
    };
    // Supplementary groups first, while still root: the user's own (initgroups), or,
    // with only a group configured, just that group, so root's do not linger.
    if let Some(user) = &identity.user {
        let name = CString::new(user.name.as_str()).map_err(|e| DaemonError::Identity {
            what: format!("user {}", user.name),
            reason: e.to_string(),
        })?;
        nix::unistd::initgroups(&name, gid.unwrap_or(user.gid))
            .map_err(|e| identity_error(&format!("user {} (supplementary groups)", user.name), e))?;
    } else if let Some(gid) = gid {
        nix::unistd::setgroups(&[gid])
            .map_err(|e| identity_error("the configured group (supplementary groups)", e))?;
    }
    if let Some(gid) = gid {
        nix::unistd::setgid(gid).map_err(|e| identity_error("the configured group", e))?;
    }
    if let Some(user) = &identity.user {
        nix::unistd::setuid(user.uid).map_err(|e| identity_error(&format!("user {}", user.name), e))?;
    }
    Ok(())
}
