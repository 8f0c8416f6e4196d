//! The journal's syncer: a long-lived child process that calls
//! `fdatasync` for the main server, so that the reactor thread never
//! blocks in one (issue 11: on ext4 a sync took 0.7 to 4 ms, during which
//! every client waited, not only the DEPLOY whose record it was).
//!
//! Owns: starting the syncer (a fork of the server: it closes every
//! descriptor but its socket, names itself `cloud-syncer`, dies with the
//! server by `PR_SET_PDEATHSIG` and at its socket's end of file, is not
//! dumpable), the request (one byte on a SOCK_SEQPACKET socketpair, with
//! the journal's descriptor as SCM_RIGHTS, so a compacted journal needs
//! nothing more), the syncer's loop (receive, `fdatasync`, close, report),
//! and the report (4 bytes: 0, or the errno of the failed sync).
//! The main service writes the records first (`Journal::write_pending`),
//! then asks; it holds the answers that wait for them until the report
//! (`MainService::end_of_turn`). A syncer that dies is noticed at its
//! socket's end of file: the main service syncs what was in flight itself,
//! on its own thread, and starts another syncer later.
//! Must not touch: the journal's contents, the reactor, replies.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;

/// The syncer's name in `ps` (and `/proc/PID/comm`).
pub const NAME: &str = "cloud-syncer";

/// The server's side of a running syncer.
#[derive(Debug)]
pub struct Syncer {
    pid: Pid,
    sock: OwnedFd,
}

/// What reading the syncer's socket found.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// The sync asked for is done: `Ok`, or the errno it failed with.
    Synced(Result<(), i32>),
    /// Nothing (yet).
    Nothing,
    /// The syncer is gone (its socket's end of file, or an error).
    Gone,
}

impl Syncer {
    /// Fork the syncer. The error says why not.
    pub fn start() -> Result<Syncer, String> {
        let (pid, sock) = crate::launcher::fork_helper("the journal syncer", |sock, server| syncer_main(sock, server))?;
        Ok(Syncer { pid, sock })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The socket to watch for reports (readable: a report or the end).
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Ask for `fdatasync(file)`; the report follows on the socket.
    pub fn request(&self, file: RawFd) -> nix::Result<()> {
        let fds = [file];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(b"S")];
        loop {
            match socket::sendmsg::<()>(self.sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// Read one report, without blocking.
    pub fn read_report(&self) -> Report {
        let mut buf = [0u8; 4];
        loop {
            match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Report::Nothing,
                Err(_) | Ok(0) => return Report::Gone,
                Ok(4) => {
                    return match i32::from_le_bytes(buf) {
                        0 => Report::Synced(Ok(())),
                        errno => Report::Synced(Err(errno)),
                    }
                }
                Ok(_) => return Report::Gone, // not a syncer's report
            }
        }
    }

    /// Stop the syncer: it ends at its socket's end of file. Reaped here if
    /// it is still ours to reap (killed first if it has not ended), never
    /// signalled once the reactor's `waitpid(-1)` may have reaped it (its
    /// pid could be another process's by then).
    pub fn stop(self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        drop(self.sock);
        if let Ok(WaitStatus::StillAlive) = waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
            let _ = kill(self.pid, Signal::SIGKILL);
            while let Err(nix::Error::EINTR) = waitpid(self.pid, None) {}
        }
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: ends the syncer without the server's atexit handlers.
    unsafe { libc::_exit(code) }
}

/// The syncer process. Never returns.
fn syncer_main(sock: OwnedFd, server: Pid) -> ! {
    crate::spawn::close_all_but(&[sock.as_raw_fd()]);
    let _ = nix::sys::prctl::set_name(c"cloud-syncer");
    // Die with the server; and if it died before this line, now.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || nix::unistd::getppid() != server {
        exit(0);
    }
    // A terminal's Ctrl-C to the server's process group is the server's.
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_dumpable(false);
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        let msg = match socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        {
            Err(nix::Error::EINTR) => continue,
            Err(_) => exit(0),
            Ok(m) => m,
        };
        if msg.bytes == 0 {
            exit(0); // the server is gone
        }
        let mut file = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: the kernel installed these descriptors
                        // in this process for us; each is owned once.
                        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                        file.get_or_insert(owned);
                    }
                }
            }
        }
        let errno = match &file {
            // SAFETY: fdatasync on a descriptor we own.
            Some(f) => match unsafe { libc::fdatasync(f.as_raw_fd()) } {
                0 => 0,
                _ => std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
            },
            None => libc::EBADF,
        };
        drop(file);
        loop {
            match socket::send(sock.as_raw_fd(), &errno.to_le_bytes(), MsgFlags::MSG_NOSIGNAL) {
                Err(nix::Error::EINTR) => continue,
                Err(_) => exit(0),
                Ok(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn wait_report(s: &Syncer) -> Report {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let mut fds = [libc::pollfd { fd: s.fd(), events: libc::POLLIN, revents: 0 }];
            // SAFETY: polls one descriptor of ours.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
            match s.read_report() {
                Report::Nothing if std::time::Instant::now() < deadline => continue,
                r => return r,
            }
        }
    }

    #[test]
    fn the_syncer_syncs_the_file_it_is_given_and_reports_failures_and_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = std::fs::File::create(dir.path().join("j")).unwrap();
        f.write_all(b"record").unwrap();
        let s = Syncer::start().unwrap();
        assert_eq!(s.read_report(), Report::Nothing);
        s.request(f.as_raw_fd()).unwrap();
        assert_eq!(wait_report(&s), Report::Synced(Ok(())));
        s.request(f.as_raw_fd()).unwrap();
        assert_eq!(wait_report(&s), Report::Synced(Ok(())));
        // A descriptor fdatasync refuses (a pipe): its errno comes back.
        let (r, _w) = nix::unistd::pipe().unwrap();
        s.request(r.as_raw_fd()).unwrap();
        assert_eq!(wait_report(&s), Report::Synced(Err(libc::EINVAL)));
        // Killed: its end is seen.
        kill(s.pid(), Signal::SIGKILL).unwrap();
        assert_eq!(wait_report(&s), Report::Gone);
        s.stop();
    }
}
