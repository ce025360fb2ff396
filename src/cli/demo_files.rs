//! The demo's migrations and policies, built into the binary so `pgward dev` works from any
//! directory (an installed binary has no source tree beside it).

use std::path::{Path, PathBuf};

use anyhow::Context;

/// `migrations/*.sql`, applied in name order.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_demo_schema.sql",
        include_str!("../../migrations/0001_demo_schema.sql"),
    ),
    (
        "0002_demo_seed.sql",
        include_str!("../../migrations/0002_demo_seed.sql"),
    ),
    (
        "0050_pgward_policy.sql",
        include_str!("../../migrations/0050_pgward_policy.sql"),
    ),
    (
        "0100_pgward_keys.sql",
        include_str!("../../migrations/0100_pgward_keys.sql"),
    ),
    (
        "0110_pgward_retired_keys.sql",
        include_str!("../../migrations/0110_pgward_retired_keys.sql"),
    ),
    (
        "0120_pgward_index_roots.sql",
        include_str!("../../migrations/0120_pgward_index_roots.sql"),
    ),
];

/// `policies/*.toml` and their tests.
const POLICIES: &[(&str, &str)] = &[
    (
        "analytics.toml",
        include_str!("../../policies/analytics.toml"),
    ),
    ("billing.toml", include_str!("../../policies/billing.toml")),
    ("support.toml", include_str!("../../policies/support.toml")),
    (
        "tests/demo.toml",
        include_str!("../../policies/tests/demo.toml"),
    ),
];

/// Write the demo migrations into `dir` (replacing older copies: they are pgward's, and
/// idempotent). Returns `dir`.
pub fn write_migrations(dir: &Path) -> anyhow::Result<PathBuf> {
    write_all(dir, MIGRATIONS, true)
}

/// Write the demo policies into `dir`, keeping files already there (a developer's edits).
pub fn write_policies(dir: &Path) -> anyhow::Result<PathBuf> {
    write_all(dir, POLICIES, false)
}

fn write_all(dir: &Path, files: &[(&str, &str)], replace: bool) -> anyhow::Result<PathBuf> {
    for (name, text) in files {
        let path = dir.join(name);
        if !replace && path.exists() {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_file_is_embedded() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let listed = |dir: &str, ext: &str| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(root.join(dir))
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(ext))
                .collect();
            names.sort();
            names
        };
        let embedded = |files: &[(&str, &str)]| -> Vec<String> {
            files
                .iter()
                .filter(|(n, _)| !n.contains('/'))
                .map(|(n, _)| n.to_string())
                .collect()
        };
        assert_eq!(listed("migrations", ".sql"), embedded(MIGRATIONS));
        assert_eq!(listed("policies", ".toml"), embedded(POLICIES));
    }

    #[test]
    fn policies_already_there_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("billing.toml"), "# edited").unwrap();
        write_policies(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("billing.toml")).unwrap(),
            "# edited"
        );
        assert!(dir.path().join("tests/demo.toml").exists());
        write_migrations(&dir.path().join("m")).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("m")).unwrap().count(),
            MIGRATIONS.len()
        );
    }
}
