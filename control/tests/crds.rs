//! The custom resource definitions in `deploy/crds/` are the controller's
//! own types, serialized: this fails when they drift apart. After changing
//! the types, write them again with
//!   LUMEN_BLESS=1 cargo test -p lumen-control --features kubernetes --test crds

use std::path::PathBuf;

use lumen_control::crd::{crds, is_istio};

fn render(header: &str, istio: bool) -> String {
    let mut out = String::from(header);
    for crd in crds().into_iter().filter(|c| is_istio(c) == istio) {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd).unwrap());
    }
    out
}

#[test]
fn deploy_holds_the_definitions_the_controller_reads() {
    // Run time, not compile time: a shared target directory may have
    // compiled this test in another checkout.
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from)
        .join("../deploy/crds");
    let files = [
        (
            root.join("lumen/policy.lumen.dev.yaml"),
            render(
                "# Generated from lumen-control's types (control/src/crd.rs); do not edit.\n# Lumen's policy kinds: RateLimit, AccessPolicy, Quota.\n",
                false,
            ),
        ),
        (
            root.join("istio/istio.io.yaml"),
            render(
                "# Generated from lumen-control's types (control/src/crd.rs); do not edit.\n# Istio's networking and security kinds, for clusters without Istio: every\n# field is kept (lumen-control validates and reports in each object's\n# status); the versions Istio serves are served.\n",
                true,
            ),
        ),
    ];
    let bless = std::env::var_os("LUMEN_BLESS").is_some();
    for (path, want) in files {
        if bless {
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} differs from the controller's types; run LUMEN_BLESS=1 cargo test -p lumen-control --features kubernetes --test crds",
            path.display()
        );
    }
}
