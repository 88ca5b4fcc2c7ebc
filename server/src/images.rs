//! [`ImageDir`]: the one directory a memory node loads VM images from (`--image-dir`).
//!
//! A VM's image path comes from the coordinator, which takes it from whoever defines the VM;
//! without this check a memory node would open any file it can read (its own keys, `/etc`,
//! another VM's image) and serve it back page by page. So an image is opened only when
//!
//! 1. its path is absolute and has no `..` component;
//! 2. it lies under the directory, as given or canonicalised (`/srv/images/vm.img` with
//!    `--image-dir /srv/images`);
//! 3. the kernel, resolving the rest of the path from a handle on the directory with
//!    `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` (openat2(2)), never leaves the directory, so a
//!    symlink inside it that points out (`vm.img -> /etc/shadow`), absolute or through `..`,
//!    is refused, and so is a directory swapped for a symlink between the check and the open:
//!    there is no gap between the two, the check is the open;
//! 4. what it opened is a regular file (not a FIFO that would block the loader, nor a device).
//!
//! Symlinks that stay inside the directory are followed.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Why an image path was refused.
#[derive(thiserror::Error, Debug)]
pub enum ImageRefusal {
    /// Not an absolute path.
    #[error("the path is not absolute")]
    Relative,
    /// A `..` component.
    #[error("the path contains `..`")]
    DotDot,
    /// Not under the directory.
    #[error("it is outside the image directory {}", .0.display())]
    Outside(PathBuf),
    /// Resolving the path would leave the directory (a symlink pointing out of it).
    #[error("it leads out of the image directory {} through a symlink", .0.display())]
    Escapes(PathBuf),
    /// Not a regular file.
    #[error("it is not a regular file")]
    NotAFile,
    /// The open or the stat failed (missing, unreadable).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The directory images are loaded from, held open so that resolving is relative to it.
#[derive(Debug)]
pub struct ImageDir {
    /// As given on the command line.
    given: PathBuf,
    /// Canonical (symlinks resolved), for paths that name it so.
    canonical: PathBuf,
    dir: OwnedFd,
}

impl ImageDir {
    /// Opens `path`, which must be a directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        let canonical = std::fs::canonicalize(path)?;
        let dir = rustix::fs::open(
            &canonical,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(ImageDir {
            given: path.to_path_buf(),
            canonical,
            dir,
        })
    }

    /// The directory, canonical.
    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// Opens `image` for reading if it is a regular file beneath the directory (see the
    /// module's documentation).
    pub fn open_image(&self, image: &str) -> Result<File, ImageRefusal> {
        let image = Path::new(image);
        if !image.is_absolute() {
            return Err(ImageRefusal::Relative);
        }
        if image.components().any(|c| c == Component::ParentDir) {
            return Err(ImageRefusal::DotDot);
        }
        let rest = image
            .strip_prefix(&self.canonical)
            .or_else(|_| image.strip_prefix(&self.given))
            .map_err(|_| ImageRefusal::Outside(self.canonical.clone()))?;
        if rest.as_os_str().is_empty() {
            return Err(ImageRefusal::NotAFile);
        }
        // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; reads of
        // a regular file ignore it.
        let fd = rustix::fs::openat2(
            &self.dir,
            rest,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| match e {
            // openat2(2): EXDEV when resolution would leave the directory.
            rustix::io::Errno::XDEV => ImageRefusal::Escapes(self.canonical.clone()),
            e => ImageRefusal::Io(e.into()),
        })?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(ImageRefusal::NotAFile);
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pagemesh-images-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("images/sub")).unwrap();
        std::fs::write(dir.join("images/vm.img"), b"image").unwrap();
        std::fs::write(dir.join("images/sub/deep.img"), b"deep").unwrap();
        std::fs::write(dir.join("secret"), b"secret").unwrap();
        dir
    }

    fn open(images: &ImageDir, path: &Path) -> Result<String, ImageRefusal> {
        let mut text = String::new();
        io::Read::read_to_string(&mut images.open_image(path.to_str().unwrap())?, &mut text)?;
        Ok(text)
    }

    #[test]
    fn images_beneath_the_directory_open_and_nothing_else_does() {
        let root = scratch("beneath");
        let images = ImageDir::open(&root.join("images")).unwrap();
        let d = root.join("images");
        assert_eq!(open(&images, &d.join("vm.img")).unwrap(), "image");
        assert_eq!(open(&images, &d.join("sub/deep.img")).unwrap(), "deep");
        // A symlink that stays inside is followed.
        symlink("sub/deep.img", d.join("inside.img")).unwrap();
        assert_eq!(open(&images, &d.join("inside.img")).unwrap(), "deep");

        let refusals = [
            (root.join("secret"), "outside"),
            (PathBuf::from("/etc/passwd"), "outside"),
            (d.join("../secret"), "`..`"),
            (d.join("sub/../vm.img"), "`..`"),
            (PathBuf::from("vm.img"), "not absolute"),
            (d.clone(), "not a regular file"),
            (d.join("sub"), "not a regular file"),
        ];
        for (path, why) in refusals {
            let err = open(&images, &path).unwrap_err();
            assert!(err.to_string().contains(why), "{}: {err}", path.display());
        }
        // Symlinks out, absolute or relative, and a directory that is a symlink out.
        symlink(root.join("secret"), d.join("abs.img")).unwrap();
        symlink("../secret", d.join("rel.img")).unwrap();
        symlink(&root, d.join("up")).unwrap();
        for name in ["abs.img", "rel.img", "up/secret"] {
            let err = open(&images, &d.join(name)).unwrap_err();
            assert!(
                matches!(err, ImageRefusal::Escapes(_)),
                "{name}: {err:?} should be an escape"
            );
            assert!(err.to_string().contains("through a symlink"), "{err}");
        }
        // A missing image is an I/O error, which names no other file.
        let err = open(&images, &d.join("missing.img")).unwrap_err();
        assert!(matches!(&err, ImageRefusal::Io(e) if e.kind() == io::ErrorKind::NotFound));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_given_through_a_symlink_takes_both_spellings() {
        let root = scratch("spellings");
        symlink(root.join("images"), root.join("link")).unwrap();
        let images = ImageDir::open(&root.join("link")).unwrap();
        assert_eq!(
            images.path(),
            std::fs::canonicalize(root.join("images")).unwrap()
        );
        assert_eq!(open(&images, &root.join("link/vm.img")).unwrap(), "image");
        assert_eq!(open(&images, &root.join("images/vm.img")).unwrap(), "image");
        // A FIFO would block a plain open; here it is refused at once.
        let fifo = root.join("images/fifo.img");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let err = open(&images, &fifo).unwrap_err();
        assert!(matches!(err, ImageRefusal::NotAFile), "{err:?}");
        assert!(ImageDir::open(&root.join("images/vm.img")).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
