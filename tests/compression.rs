//! Packed runs (`--compress`) between real processes: a guest reads a memory image whose
//! pages compress (and some of which are all zero) from two memory nodes, its bytes checked;
//! the same against memory nodes that do not offer packing (`--compress off`): the runs
//! travel plain and the guest reads the same bytes. How the wire bytes fall is read from the
//! memory nodes' `/stats`.

use std::time::Duration;

use pagemesh_api::pattern;
use pagemesh_tests::{Bins, Cluster, http_json, test_dir};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Pages of the image (8 MiB).
const PAGES: u64 = 2048;
const SEED: u64 = 42;

/// Page `p` of the image: the pattern's first word, then text that varies by page; every
/// eighth page all zero.
fn image_page(p: u64, page: &mut [u8]) {
    if p % 8 == 7 {
        page.fill(0);
        return;
    }
    let text = format!("page {p} of a guest's memory, which compresses well; ");
    for (b, t) in page.iter_mut().zip(text.bytes().cycle()) {
        *b = t;
    }
    page[..8].copy_from_slice(&pattern::first_word(SEED, p).to_le_bytes());
}

/// The checksum a `read` guest reports over the image: the sum of each page's first word.
fn expected_checksum() -> u64 {
    (0..PAGES)
        .filter(|p| p % 8 != 7)
        .fold(0u64, |a, p| a.wrapping_add(pattern::first_word(SEED, p)))
}

/// Runs a `seq` read of the whole image on `c` with `compress`; returns the memory nodes'
/// packed pages and bytes.
fn read_image(c: &mut Cluster, compress: &str) -> (u64, u64) {
    let image = c.dir.join("guest.img");
    let mut bytes = vec![0u8; (PAGES * 4096) as usize];
    for (p, page) in bytes.chunks_exact_mut(4096).enumerate() {
        image_page(p as u64, page);
    }
    std::fs::write(&image, &bytes).unwrap();
    let (status, s, proc) = c
        .run_compute(
            &[
                "--mem",
                "8MiB",
                "--image",
                image.to_str().unwrap(),
                "--workload",
                "seq",
                "--access",
                "read",
                "--compress",
                compress,
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert!(status.success() && s.ok, "{status}: {}", proc.log_tail());
    assert_eq!(s.faults.remote, PAGES, "{s:#?}");
    assert_eq!(
        s.result.map(|r| r.checksum),
        Some(expected_checksum()),
        "the bytes came from the image"
    );
    c.memory.iter().fold((0, 0), |(pages, bytes), m| {
        let stats = http_json(&format!("{}/stats", m.admin)).unwrap();
        let server = &stats["server"];
        (
            pages + server["packed_pages"].as_u64().unwrap(),
            bytes + server["packed_bytes"].as_u64().unwrap(),
        )
    })
}

#[test]
fn compressible_pages_travel_packed_and_arrive_whole() {
    let bins = Bins::for_tests().unwrap();
    let mut c = Cluster::start(bins, test_dir("compress-on"), &[1, 2], "512MiB").unwrap();
    let (pages, bytes) = read_image(&mut c, "on");
    assert_eq!(pages, PAGES, "every fetch came back packed");
    assert!(
        bytes < PAGES * 4096 / 10,
        "{bytes} bytes on the wire for {pages} pages"
    );
}

#[test]
fn memory_nodes_that_do_not_offer_packing_serve_plain_runs() {
    let bins = Bins::for_tests().unwrap();
    let off = ["--compress".to_owned(), "off".to_owned()];
    let mut c =
        Cluster::start_with(bins, test_dir("compress-off"), &[1, 2], "512MiB", &off).unwrap();
    let (pages, _) = read_image(&mut c, "on");
    assert_eq!(pages, 0, "nothing travelled packed");
}
