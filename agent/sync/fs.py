"""The disk edge: every file operation on a synced folder, never through a symlink.

Theory: names are validated before they get here (agent.sync.paths). Each operation walks from
the folder's root directory fd one component at a time with O_NOFOLLOW|O_DIRECTORY and then acts
relative to the parent's fd, so a symlink or a swapped directory anywhere on the way fails with
ELOOP/ENOTDIR instead of escaping the folder. Writes go to `.tofu-tmp-*` files beside the target
and are renamed over it only after their data is durable.

Inside `batch()` (one engine step) the directory fds a walk opened are kept and reused, for at
most `DIR_CACHE_SECONDS`: thousands of files in a hundred directories then cost a hundred walks,
not thousands. A cached fd is a directory that was reached without a symlink, so it can only stop
being the right place if someone moves that directory during those milliseconds; our own rmdir
and rename drop the entries they invalidate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import stat
import time
from collections.abc import Container, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.sync.names import MARKER, TEMP_PREFIX, split_name

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_CACHE_SECONDS = 0.5  # longest a walked directory fd is reused inside a batch
MAX_CACHED_DIRS = 256


def _load_syncfs() -> ctypes._NamedFuncPointer | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()


def temp_name_for(name: str) -> str:
    """The deterministic temp file name (in the same directory) used while fetching `name`."""
    _, base = split_name(name)
    return TEMP_PREFIX + hashlib.sha256(base.encode("utf-8")).hexdigest()[:24]


class FolderFS:
    """Safe file operations relative to one folder root."""

    def __init__(self, root: Path, *, need_root: bool = True) -> None:
        """Open `root`; with `need_root=False` a missing root leaves the fd closed until `refresh`.

        :raises OSError: `root` cannot be opened as a directory (only with `need_root`).
        """
        self.root = root
        self._root_fd = -1  # operations on a closed root fail with EBADF, an OSError like any other
        self._root_id = (0, 0)
        self._batch_depth = 0
        self._dirs: dict[str, int] = {}  # dirname -> walked directory fd, only inside `batch()`
        self._dirs_since = 0.0
        try:
            self._open_root()
        except OSError:
            if need_root:
                raise

    def _open_root(self) -> None:
        # The root itself may be a symlink the user chose (~/Sync -> /data/sync), as in Syncthing;
        # only what lies inside it is never followed.
        fd = os.open(self.root, _DIR_FLAGS & ~os.O_NOFOLLOW)
        st = os.fstat(fd)
        self._drop_dirs()
        if self._root_fd >= 0:
            os.close(self._root_fd)
        self._root_fd, self._root_id = fd, (st.st_dev, st.st_ino)

    def refresh(self) -> bool:
        """True if the root is there with its marker; the root is reopened if it was replaced
        (a disk mounted again, a folder moved back), so operations act on what the path names."""
        try:
            st = os.stat(self.root)
            mark = os.lstat(self.root / MARKER)
        except OSError:
            return False
        if not stat.S_ISDIR(mark.st_mode):
            return False
        if (st.st_dev, st.st_ino) != self._root_id:
            try:
                self._open_root()
            except OSError:
                return False
        return True

    def make_marker(self) -> None:
        """Create the root if missing and its marker: from now on this directory is the folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.root / MARKER, 0o755)
        except FileExistsError:
            pass
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.refresh()

    def free_space(self) -> tuple[int, int]:
        """(bytes free for us, total bytes) of the file system the folder is on.

        :raises OSError: the root is not open.
        """
        st = os.fstatvfs(self._root_fd)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def close(self) -> None:
        """Release the root directory fd."""
        self._drop_dirs()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Reuse walked directory fds until the outermost `batch()` ends (see the module doc)."""
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            if not self._batch_depth:
                self._drop_dirs()

    def _drop_dirs(self, under: str | None = None) -> None:
        """Close cached directory fds: all, or `under` and everything below it."""
        for name in list(self._dirs):
            if under is None or name == under or name.startswith(under + "/") or not under:
                os.close(self._dirs.pop(name))

    def open_dir(self, dirname: str, create: bool = False) -> int:
        """An fd of directory `dirname` ('' is the root), walked without following symlinks.

        The caller closes it. Inside `batch()` it is a dup of a cached walk.

        :raises OSError: ELOOP/ENOTDIR if a component is a symlink or not a directory.
        """
        if not dirname:
            return os.dup(self._root_fd)
        if not self._batch_depth:
            return self._walk(os.dup(self._root_fd), dirname.split("/"), create)
        now = time.monotonic()
        if now - self._dirs_since > DIR_CACHE_SECONDS:
            self._drop_dirs()
            self._dirs_since = now
        fd = self._dirs.get(dirname)
        if fd is None:
            parent, _, last = dirname.rpartition("/")
            fd = self._walk(self.open_dir(parent, create), [last], create)
            if len(self._dirs) >= MAX_CACHED_DIRS:
                return fd
            self._dirs[dirname] = fd
        return os.dup(fd)

    @staticmethod
    def _walk(fd: int, parts: list[str], create: bool) -> int:
        """Walk `parts` down from directory fd `fd` (consumed); the fd of the last one."""
        try:
            for part in parts:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def lstat(self, name: str) -> os.stat_result | None:
        """lstat of `name`, or None if it or a parent does not exist (or a parent is not a real dir)."""
        parent, base = split_name(name)
        try:
            fd = self.open_dir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None
            raise
        try:
            return os.stat(base, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(fd)

    def open_read(self, name: str) -> int:
        """An fd to read regular file `name`.

        :raises OSError: if missing, a symlink, or not a regular file.
        """
        parent, base = split_name(name)
        return self._open_regular(parent, base, name)

    def _open_regular(self, parent: str, base: str, what: str) -> int:
        """A read-only fd of regular file `base` in directory `parent`, never through a symlink."""
        dfd = self.open_dir(parent)
        try:
            # O_NONBLOCK: a FIFO put at a synced name must not hang the open (no effect on files)
            fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, f"{what} is not a regular file")
        return fd

    def open_temp(self, name: str, busy: Container[tuple[int, int]] = ()) -> tuple[int, bool]:
        """(fd, existed) of the temp file for `name`, creating parent directories as needed.

        A temp file whose inode (st_dev, st_ino) is in `busy` belongs to another pull still
        writing into it (its directory was renamed under it): it is never resumed, but replaced
        by a fresh one, or the two pulls would write into one file.
        """
        parent, _ = split_name(name)
        dfd = self.open_dir(parent, create=True)
        tmp = temp_name_for(name)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

        def create() -> tuple[int, bool]:
            return os.open(tmp, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd), False

        try:
            # Created first: a new temp file is the common case, and O_EXCL makes it a fresh
            # regular file without a failed lookup or an fstat before it.
            return create()
        except FileExistsError:
            try:
                fd = os.open(tmp, flags, dir_fd=dfd)  # (a symlink fails here: O_NOFOLLOW)
            except FileNotFoundError:  # deleted since: a new one after all
                return create()
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, f"temp file for {name} is not a regular file") from None
            if (st.st_dev, st.st_ino) not in busy:
                return fd, True
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)  # the other pull keeps its inode; its commit will see it moved
            return create()
        finally:
            os.close(dfd)

    def open_temp_direct(self, name: str, fd: int) -> int:
        """A second, write-only O_DIRECT fd of the temp file of `name` already open as `fd`; -1 if unsupported.

        Direct writes bypass the page cache: a large download then costs no page-cache allocation
        and no writeback at fsync time (the data is on the device when each write returns).
        """
        return self._reopen_direct(name, temp_name_for(name), os.O_WRONLY, fd)

    def open_read_direct(self, name: str, fd: int) -> int:
        """A second, read-only O_DIRECT fd of file `name` already open as `fd`; -1 if unsupported."""
        return self._reopen_direct(name, split_name(name)[1], os.O_RDONLY, fd)

    def _reopen_direct(self, name: str, base: str, mode: int, fd: int) -> int:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return -1
        try:
            dfd = self.open_dir(split_name(name)[0])
        except OSError:
            return -1
        try:
            dio = os.open(base, mode | os.O_NOFOLLOW | os.O_CLOEXEC | flag, dir_fd=dfd)
        except OSError:
            return -1  # e.g. tmpfs refuses O_DIRECT
        finally:
            os.close(dfd)
        a, b = os.fstat(fd), os.fstat(dio)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            os.close(dio)  # replaced under us: use only the fd that was checked
            return -1
        return dio

    def commit_temp(self, name: str) -> os.stat_result:
        """Rename the temp file of `name` over `name` atomically; the stat of the result."""
        parent, _ = split_name(name)
        dfd = self.open_dir(parent)
        try:
            return self.commit_temp_at(dfd, name)
        finally:
            os.close(dfd)

    @staticmethod
    def commit_temp_at(dfd: int, name: str) -> os.stat_result:
        """`commit_temp` in the already open parent directory `dfd` of `name`."""
        base = split_name(name)[1]
        os.rename(temp_name_for(name), base, src_dir_fd=dfd, dst_dir_fd=dfd)
        return os.stat(base, dir_fd=dfd, follow_symlinks=False)

    @staticmethod
    def lstat_at(dfd: int, base: str) -> os.stat_result | None:
        """lstat of `base` in directory `dfd`, or None if it does not exist."""
        try:
            return os.stat(base, dir_fd=dfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def remove_temp(self, name: str) -> None:
        """Delete the temp file of `name` if there is one."""
        self.unlink(name, temp=True)

    def unlink(self, name: str, temp: bool = False) -> None:
        """Delete file `name` (or its temp file); missing is fine."""
        parent, base = split_name(name)
        try:
            dfd = self.open_dir(parent)
        except FileNotFoundError:
            return
        try:
            os.unlink(temp_name_for(name) if temp else base, dir_fd=dfd)
        except FileNotFoundError:
            pass
        finally:
            os.close(dfd)

    @contextmanager
    def _two_dirs(self, old: str, new: str) -> Iterator[tuple[int, str, int, str]]:
        """(fd of `old`'s directory, its base name, fd of `new`'s directory (made), its base name)."""
        op, ob = split_name(old)
        np_, nb = split_name(new)
        sfd = self.open_dir(op)
        try:
            dfd = self.open_dir(np_, create=True)
            try:
                yield sfd, ob, dfd, nb
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def rename(self, old: str, new: str) -> None:
        """Rename file `old` to `new` (same folder), refusing to replace an existing `new`."""
        with self._two_dirs(old, new) as (sfd, ob, dfd, nb):
            if self.lstat_at(dfd, nb) is not None:
                raise FileExistsError(errno.EEXIST, f"{new} exists")
            os.rename(ob, nb, src_dir_fd=sfd, dst_dir_fd=dfd)
            self._drop_dirs(old)  # in case it was a directory

    def link(self, old: str, new: str) -> None:
        """Give file `old` a second name `new` (same folder; parents made), without following
        symlinks; where the file system has no hard links, `new` is a durable copy instead.

        :raises FileExistsError: `new` exists.
        """
        with self._two_dirs(old, new) as (sfd, ob, dfd, nb):
            try:
                os.link(ob, nb, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                _copy_at(sfd, ob, dfd, nb)

    def rmdir(self, name: str) -> bool:
        """Remove empty directory `name`; False if it is not empty."""
        parent, base = split_name(name)
        dfd = self.open_dir(parent)
        self._drop_dirs(name)
        try:
            os.rmdir(base, dir_fd=dfd)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        finally:
            os.close(dfd)

    def remove_temps(self, dirname: str, keep: set[str]) -> None:
        """Delete our temp files directly in directory `dirname`, except those named in `keep`."""
        try:
            dfd = self.open_dir(dirname)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            for entry in os.listdir(dfd):
                if entry.startswith(TEMP_PREFIX) and entry not in keep:
                    try:
                        os.unlink(entry, dir_fd=dfd)  # unlink never follows a symlink
                    except (FileNotFoundError, IsADirectoryError, PermissionError):
                        pass
        finally:
            os.close(dfd)

    def mkdir(self, name: str) -> os.stat_result:
        """Create directory `name` and its parents; the stat of the result."""
        fd = self.open_dir(name, create=True)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, dirname: str) -> None:
        """Make renames and deletions in `dirname` durable."""
        try:
            fd = self.open_dir(dirname)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_temps(self, names: list[str]) -> set[str]:
        """Make the data of the temp files of `names` durable; returns names whose temp is gone.

        One syncfs for many (the caller checks each temp file is still the one it wrote before
        renaming it), else fsync each. A temp file is opened, never created, here: if its
        directory was swapped meanwhile, an empty new temp file must not be mistaken for the data.
        """
        if len(names) > 8 and _SYNCFS is not None and _SYNCFS(self._root_fd) == 0:
            return set()
        lost: set[str] = set()
        for name in names:
            try:
                fd = self._open_existing_temp(name)
            except OSError:
                lost.add(name)
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return lost

    def _open_existing_temp(self, name: str) -> int:
        return self._open_regular(split_name(name)[0], temp_name_for(name), f"temp file for {name}")


def _copy_at(sfd: int, src: str, dfd: int, dst: str) -> None:
    """Copy regular file `src` (in directory `sfd`) to new file `dst` (in `dfd`), flushed to disk."""
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=sfd)
    try:
        st = os.fstat(fd_in)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{src} is not a regular file")
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, st.st_mode & 0o777, dir_fd=dfd)
        try:
            copy_fd(fd_in, fd_out)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def copy_fd(fd_in: int, fd_out: int) -> None:
    """Copy all of `fd_in` (freshly opened: at position 0) into `fd_out` at its position, in the kernel.

    :raises OSError: also when the source shrinks while it is copied.
    """
    left = os.fstat(fd_in).st_size
    while left > 0:
        n = os.copy_file_range(fd_in, fd_out, min(left, 1 << 30))
        if n == 0:
            raise OSError(errno.EIO, "the file shrank while it was copied")
        left -= n
