//! A VM's recorded working set: the pages a run faulted on, each once in the order of its
//! first fault (`--record-working-set`), loaded ahead by a later run of the same VM
//! (`--replay-working-set`), as REAP and FaaSnap do for snapshot restores.
//!
//! The file is JSON (a few bytes per page; a 256 MiB guest's full set is under 400 KiB):
//!
//! ```json
//! {"format": "pagemesh-working-set/1", "guest_pages": 65536,
//!  "content": {"kind": "pattern", "seed": 7}, "image_len": null, "pages": [0, 1, 9, ...]}
//! ```
//!
//! `guest_pages`, `content` and (for an image) `image_len` say which VM it belongs to: a
//! replay on a VM where any of them differs is refused, since its pages would be another
//! VM's guess.

use std::path::{Path, PathBuf};

use pagemesh_api::Content;
use pagemesh_pager::PrefetchConfig;
use pagemesh_transport::TransportManager;
use serde::{Deserialize, Serialize};

use crate::NodeError;
use crate::config::Settings;

/// The `format` of the files this version writes and reads.
pub const FORMAT: &str = "pagemesh-working-set/1";

/// Errors reading or writing a working set.
#[derive(thiserror::Error, Debug)]
pub enum WorkingSetError {
    /// The file cannot be read.
    #[error("cannot read the working set {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// The file cannot be written.
    #[error("cannot write the working set {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    /// The file is not a working set of this format.
    #[error("{} is not a pagemesh working set ({why}); record one with --record-working-set", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The file is another VM's.
    #[error(
        "the working set {} was recorded for a VM with {what} {recorded}, but this VM has \
         {what} {here}; record one for this VM with --record-working-set{hint}",
        .path.display()
    )]
    OtherVm {
        /// The file.
        path: PathBuf,
        /// What differs.
        what: &'static str,
        /// The file's.
        recorded: String,
        /// This VM's.
        here: String,
        /// Another way out, if there is one (from ", ").
        hint: String,
    },
}

/// Which VM a working set belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmIdentity {
    /// Guest RAM in pages.
    pub guest_pages: u64,
    /// What its pages held at the start.
    pub content: Content,
    /// The image's length in bytes, for image content (a rebuilt image of another size at
    /// the same path is another VM).
    pub image_len: Option<u64>,
}

impl VmIdentity {
    /// The identity of a VM of `guest_pages` pages loaded with `content` (an image's length
    /// is read from the file; an image that cannot be read has none).
    pub fn new(guest_pages: u64, content: Content) -> Self {
        let image_len = match &content {
            Content::Image { path } => std::fs::metadata(path).ok().map(|m| m.len()),
            Content::Zero | Content::Pattern { .. } => None,
        };
        VmIdentity {
            guest_pages,
            content,
            image_len,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct File {
    format: String,
    #[serde(flatten)]
    vm: VmIdentity,
    pages: Vec<u64>,
}

/// Writes `pages` (faulted on, in order; each page's first entry is kept) as the working set
/// of `vm` to `path`, replacing it whole (written beside it, then renamed); returns how many
/// pages it holds.
pub fn save(path: &Path, vm: &VmIdentity, pages: &[u32]) -> Result<usize, WorkingSetError> {
    let mut seen = vec![false; vm.guest_pages as usize];
    let mut kept = Vec::with_capacity(pages.len());
    for &p in pages {
        if let Some(s) = seen.get_mut(p as usize)
            && !*s
        {
            *s = true;
            kept.push(u64::from(p));
        }
    }
    let file = File {
        format: FORMAT.to_string(),
        vm: vm.clone(),
        pages: kept,
    };
    let text = serde_json::to_vec(&file).expect("a working set serializes");
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| WorkingSetError::Write(path.to_path_buf(), e))?;
    Ok(file.pages.len())
}

/// Reads the working set at `path`, refusing one of another VM than `vm` or with pages
/// outside it.
pub fn load(path: &Path, vm: &VmIdentity) -> Result<Vec<u64>, WorkingSetError> {
    let text = std::fs::read(path).map_err(|e| WorkingSetError::Read(path.to_path_buf(), e))?;
    let invalid = |why: String| WorkingSetError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let file: File = serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    if file.format != FORMAT {
        return Err(invalid(format!(
            "its format is {:?}, this node reads {FORMAT:?}",
            file.format
        )));
    }
    let other = |what, recorded: String, here: String, hint: String| {
        Err(WorkingSetError::OtherVm {
            path: path.to_path_buf(),
            what,
            recorded,
            here,
            hint,
        })
    };
    if file.vm.guest_pages != vm.guest_pages {
        return other(
            "guest pages",
            file.vm.guest_pages.to_string(),
            vm.guest_pages.to_string(),
            String::new(),
        );
    }
    if file.vm.content != vm.content {
        // The built-in guest's seed comes from the clock unless given.
        let hint = match file.vm.content {
            Content::Pattern { seed } if matches!(vm.content, Content::Pattern { .. }) => {
                format!(", or give --seed {seed} to run the recorded one")
            }
            _ => String::new(),
        };
        return other(
            "content",
            describe(&file.vm.content),
            describe(&vm.content),
            hint,
        );
    }
    if file.vm.image_len != vm.image_len {
        let len = |l: Option<u64>| l.map_or("unknown".into(), |l| format!("{l} bytes"));
        return other(
            "image length",
            len(file.vm.image_len),
            len(vm.image_len),
            String::new(),
        );
    }
    if let Some(p) = file.pages.iter().find(|&&p| p >= vm.guest_pages) {
        return Err(invalid(format!(
            "page {p} is outside its {} pages",
            vm.guest_pages
        )));
    }
    Ok(file.pages)
}

fn describe(c: &Content) -> String {
    match c {
        Content::Zero => "zero".into(),
        Content::Pattern { seed } => format!("pattern seed {seed}"),
        Content::Image { path } => format!("image {path}"),
    }
}

/// The working set `--replay-working-set` names, for the VM `vm`; empty without the flag.
pub(crate) fn to_replay(settings: &Settings, vm: &VmIdentity) -> Result<Vec<u64>, NodeError> {
    let Some(path) = &settings.compute.replay_working_set else {
        return Ok(Vec::new());
    };
    let pages = load(path, vm)?;
    tracing::info!(
        "replaying the working set {} ({} pages) from the start",
        path.display(),
        pages.len()
    );
    Ok(pages)
}

/// The prefetch thread's work: streams with `--prefetch`, `replay` with
/// `--replay-working-set`, on `transport` (there with either).
pub(crate) fn prefetch_config(
    settings: &Settings,
    transport: Option<TransportManager>,
    replay: Vec<u64>,
) -> Option<PrefetchConfig> {
    Some(PrefetchConfig {
        transport: transport?,
        streams: settings.compute.prefetch,
        replay,
    })
}

/// Writes the recorded `pages` of `vm` where `--record-working-set` says, if it does.
pub(crate) fn record(
    settings: &Settings,
    vm: &VmIdentity,
    pages: Option<&[u32]>,
) -> Result<(), NodeError> {
    let (Some(path), Some(pages)) = (&settings.compute.record_working_set, pages) else {
        return Ok(());
    };
    let n = save(path, vm, pages)?;
    tracing::info!("recorded a working set of {n} pages to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file name of its own for each test, in the temporary directory.
    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("pagemesh-ws-{}-{name}.json", std::process::id()))
    }

    fn vm(pages: u64, seed: u64) -> VmIdentity {
        VmIdentity::new(pages, Content::Pattern { seed })
    }

    #[test]
    fn round_trip_keeps_first_faults_in_order() {
        let path = scratch("round-trip");
        let n = save(&path, &vm(16, 3), &[5, 2, 5, 9, 2, 40, 0]).unwrap();
        assert_eq!(n, 4, "repeats and pages outside the VM dropped");
        assert_eq!(load(&path, &vm(16, 3)).unwrap(), vec![5, 2, 9, 0]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn another_vm_is_refused_by_name() {
        let path = scratch("other-vm");
        save(&path, &vm(16, 3), &[1]).unwrap();
        let e = load(&path, &vm(32, 3)).unwrap_err().to_string();
        assert!(
            e.contains("guest pages 16") && e.contains("guest pages 32"),
            "{e}"
        );
        assert!(e.contains("--record-working-set"), "{e}");
        let e = load(&path, &vm(16, 4)).unwrap_err().to_string();
        assert!(
            e.contains("pattern seed 3") && e.contains("pattern seed 4"),
            "{e}"
        );
        assert!(
            e.ends_with("or give --seed 3 to run the recorded one"),
            "{e}"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn bad_files_are_refused() {
        let path = scratch("bad");
        std::fs::write(&path, b"{\"format\":\"x\"}").unwrap();
        assert!(matches!(
            load(&path, &vm(16, 3)),
            Err(WorkingSetError::Invalid { .. })
        ));
        std::fs::write(
            &path,
            br#"{"format":"pagemesh-working-set/1","guest_pages":16,
                "content":{"kind":"pattern","seed":3},"image_len":null,"pages":[16]}"#,
        )
        .unwrap();
        let e = load(&path, &vm(16, 3)).unwrap_err().to_string();
        assert!(e.contains("page 16 is outside"), "{e}");
        assert!(matches!(
            load(&scratch("none"), &vm(16, 3)),
            Err(WorkingSetError::Read(..))
        ));
        let _ = std::fs::remove_file(path);
    }
}
