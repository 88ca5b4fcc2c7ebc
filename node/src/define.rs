//! What a compute node asks the coordinator for: the guest's content, placement and
//! workload, from the compute settings (already typed and checked, see [`crate::config`]).

use std::time::{SystemTime, UNIX_EPOCH};

use pagemesh_api::{Content, PageRange, PlacementRequest};
use pagemesh_vmm::Workload;

use crate::config::values::{ContentArg, PlacementArg, WorkloadArg};
use crate::config::{ComputeOptions, Settings};
use crate::coordinator::CoordinatorClient;
use crate::error::NodeError;

/// Seeds differ per run so that a page left over from another VM fails verification.
pub(crate) fn default_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1
}

/// The seed of the test pattern: `--seed`, else one from the clock.
pub(crate) fn seed(c: &ComputeOptions) -> u64 {
    c.seed.unwrap_or_else(default_seed)
}

/// The workload the built-in guest runs (`--workload`, else `verify`) over `--range`, else
/// all of guest RAM.
pub(crate) fn workload(c: &ComputeOptions) -> Result<Workload, NodeError> {
    let ram_pages = c.mem().pages();
    let (first, pages) = c.range.map_or((0, ram_pages), |r| r.pages());
    let (order, access) = c
        .workload
        .unwrap_or(WorkloadArg::Verify)
        .order_and_access(c.access);
    let w = Workload::new(order, access, first, pages, ram_pages)?;
    Ok(match c.accesses {
        Some(n) => w.with_accesses(n)?,
        None => w,
    })
}

/// What the memory nodes load: the `--image` file, else `--content`.
pub(crate) fn content(c: &ComputeOptions) -> Result<Content, NodeError> {
    if let Some(image) = &c.image {
        let path = std::fs::canonicalize(image).map_err(|e| NodeError::Image(image.clone(), e))?;
        return Ok(Content::Image {
            path: path.display().to_string(),
        });
    }
    match c.content {
        ContentArg::Pattern => Ok(Content::Pattern { seed: seed(c) }),
        ContentArg::Zero => Ok(Content::Zero),
        // Settings::check refuses `--content image` without `--image`.
        ContentArg::Image => Err(crate::config::ConfigError::Missing("--image").into()),
    }
}

/// How the VM's pages are to be spread over the memory nodes; with no `--memory-nodes`, the
/// coordinator takes every memory node of the compute node's cluster, and so does `ranges`.
pub(crate) fn placement_request(
    settings: &Settings,
    coordinator: &CoordinatorClient,
    pages: u64,
) -> Result<PlacementRequest, NodeError> {
    let c = &settings.compute;
    let nodes = c.memory_nodes.clone().unwrap_or_default();
    Ok(match c.placement {
        PlacementArg::Interleave => PlacementRequest::Interleave {
            nodes,
            // A huge page is fetched at once: all of it from one home.
            granule_pages: if c.huge_pages { 512 } else { 1 },
        },
        PlacementArg::Weighted => PlacementRequest::Weighted { nodes },
        PlacementArg::Ranges => {
            let nodes = if nodes.is_empty() {
                coordinator
                    .nodes()?
                    .into_iter()
                    .filter(|n| {
                        n.role.serves_memory()
                            && n.cluster == settings.cluster
                            && Some(n.node_id) != settings.id
                    })
                    .map(|n| n.node_id)
                    .collect()
            } else {
                nodes
            };
            PlacementRequest::Ranges {
                ranges: equal_ranges(&nodes, pages),
            }
        }
    })
}

/// `pages` pages cut into one contiguous range per node, in order, of sizes that differ by
/// at most one page.
fn equal_ranges(nodes: &[pagemesh_api::NodeId], pages: u64) -> Vec<PageRange> {
    let k = nodes.len().max(1) as u64;
    nodes
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
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use pagemesh_vmm::{Access, Order};

    use super::*;

    fn compute(args: &[&str]) -> ComputeOptions {
        Settings::try_parse_from(std::iter::once("pagemesh-node").chain(args.iter().copied()))
            .unwrap()
            .compute
    }

    #[test]
    fn the_workload_defaults_to_verifying_all_of_ram() {
        let w = workload(&compute(&[])).unwrap();
        assert_eq!((w.order, w.access), (Order::Seq, Access::Verify));
        assert_eq!((w.first_page, w.pages), (0, 65536));
        // The benchmark backings default to 64 MiB.
        let w = workload(&compute(&["--backing", "uffd-local"])).unwrap();
        assert_eq!(w.pages, 16384);
    }

    #[test]
    fn the_workload_takes_its_order_access_and_range() {
        let w = workload(&compute(&[
            "--workload",
            "random",
            "--access",
            "rmw",
            "--range",
            "8MiB:8MiB",
            "--mem",
            "64MiB",
        ]))
        .unwrap();
        assert_eq!((w.order, w.access), (Order::Random, Access::Rmw));
        assert_eq!((w.first_page, w.pages), (2048, 2048));
        // verify ignores --access.
        let w = workload(&compute(&["--workload", "verify", "--access", "write"])).unwrap();
        assert_eq!(w.access, Access::Verify);
        // Past the end of RAM: the guest's own check.
        let e = workload(&compute(&["--range", "60MiB:8MiB", "--mem", "64MiB"])).unwrap_err();
        assert_eq!(
            pagemesh_api::error_chain(&e),
            "bad workload: range of 2048 pages at page 15360 does not fit in 16384 pages of RAM"
        );
    }

    #[test]
    fn content_follows_the_image_then_the_content_flag() {
        assert_eq!(
            content(&compute(&["--seed", "7"])).unwrap(),
            Content::Pattern { seed: 7 }
        );
        assert_eq!(
            content(&compute(&["--content", "zero"])).unwrap(),
            Content::Zero
        );
        // The clock seeds an unseeded pattern; seeds are odd.
        match content(&compute(&[])).unwrap() {
            Content::Pattern { seed } => assert_eq!(seed & 1, 1),
            other => panic!("{other:?}"),
        }
        let image = std::env::temp_dir();
        let c = content(&compute(&[
            "--content",
            "zero",
            "--image",
            image.to_str().unwrap(),
        ]));
        assert!(matches!(c.unwrap(), Content::Image { .. }));
        let e = content(&compute(&["--image", "/nonexistent/guest.img"])).unwrap_err();
        assert!(
            pagemesh_api::error_chain(&e)
                .starts_with("cannot open the image /nonexistent/guest.img"),
            "{e}"
        );
    }

    #[test]
    fn equal_ranges_cover_every_page_once() {
        let r = equal_ranges(&[3, 1, 2], 10);
        assert_eq!(
            r.iter()
                .map(|r| (r.node, r.start, r.pages))
                .collect::<Vec<_>>(),
            [(3, 0, 3), (1, 3, 3), (2, 6, 4)]
        );
        assert!(equal_ranges(&[], 10).is_empty());
    }
}
