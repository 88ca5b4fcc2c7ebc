//! What a compute node asks the coordinator for: the guest's size, content, placement and
//! workload, from the settings.

use std::time::{SystemTime, UNIX_EPOCH};

use pagemesh_api::{Content, PAGE_SIZE, PageRange, PlacementRequest};
use pagemesh_vmm::Workload;

use crate::config::{ConfigError, PlacementArg, Settings, parse_size};
use crate::coordinator::CoordinatorClient;
use crate::error::NodeError;

/// Seeds differ per run so that a page left over from another VM fails verification.
pub(crate) fn default_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

/// Guest memory in bytes (`--mem`, else `default`), checked.
pub(crate) fn guest_mem(settings: &Settings, default: u64) -> Result<u64, NodeError> {
    let mem = settings.mem.unwrap_or(default);
    if mem == 0 || !mem.is_multiple_of(PAGE_SIZE as u64) || mem > pagemesh_vmm::memory::MAX_RAM {
        return Err(ConfigError::Invalid {
            what: "--mem",
            why: format!(
                "guest memory must be a non-zero multiple of 4 KiB and at most 63 GiB, got {mem} bytes"
            ),
        }
        .into());
    }
    Ok(mem)
}

/// The workload the built-in guest runs, over guest RAM of `ram_pages` pages.
pub(crate) fn workload(settings: &Settings, ram_pages: u64) -> Result<Workload, NodeError> {
    let (first, pages) = match &settings.range {
        None => (0, ram_pages),
        Some(r) => {
            let (off, len) = r.split_once(':').ok_or_else(|| ConfigError::Invalid {
                what: "--range",
                why: format!("'{r}' is not OFFSET:LENGTH"),
            })?;
            let bad = |why: String| ConfigError::Invalid {
                what: "--range",
                why,
            };
            let off = parse_size(off).map_err(bad)?;
            let len = parse_size(len).map_err(bad)?;
            (off / PAGE_SIZE as u64, len.div_ceil(PAGE_SIZE as u64))
        }
    };
    Ok(Workload::parse(
        settings.workload.as_deref().unwrap_or("verify"),
        settings.access.as_deref().unwrap_or("read"),
        first,
        pages,
        ram_pages,
    )?)
}

/// What the memory nodes load.
pub(crate) fn content(settings: &Settings) -> Result<Content, NodeError> {
    if let Some(image) = &settings.image {
        let path = std::fs::canonicalize(image).map_err(|e| ConfigError::Invalid {
            what: "--image",
            why: format!("{}: {e}", image.display()),
        })?;
        return Ok(Content::Image {
            path: path.display().to_string(),
        });
    }
    match settings.content.as_deref().unwrap_or("pattern") {
        "pattern" => Ok(Content::Pattern {
            seed: settings.seed.unwrap_or_else(default_seed),
        }),
        "zero" => Ok(Content::Zero),
        "image" => Err(ConfigError::Missing("--image (for --content image)").into()),
        other => Err(ConfigError::Invalid {
            what: "--content",
            why: format!("'{other}'; expected pattern, zero or image"),
        }
        .into()),
    }
}

/// How the VM's pages are to be spread over the memory nodes.
pub(crate) fn placement_request(
    settings: &Settings,
    coordinator: &CoordinatorClient,
    pages: u64,
) -> Result<PlacementRequest, NodeError> {
    let nodes = settings.memory_nodes.clone().unwrap_or_default();
    Ok(
        match settings.placement.unwrap_or(PlacementArg::Interleave) {
            PlacementArg::Interleave => PlacementRequest::Interleave {
                nodes,
                granule_pages: 1,
            },
            PlacementArg::Weighted => PlacementRequest::Weighted { nodes },
            PlacementArg::Ranges => {
                let nodes = if nodes.is_empty() {
                    coordinator
                        .nodes()?
                        .into_iter()
                        .filter(|n| n.role.serves_memory())
                        .map(|n| n.node_id)
                        .collect()
                } else {
                    nodes
                };
                let k = nodes.len().max(1) as u64;
                let ranges = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, &node)| {
                        let i = i as u64;
                        let start = pages * i / k;
                        PageRange {
                            start,
                            pages: pages * (i + 1) / k - start,
                            node,
                        }
                    })
                    .collect();
                PlacementRequest::Ranges { ranges }
            }
        },
    )
}
