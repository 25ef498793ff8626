//! Man pages and shell completions, generated from the clap definitions so they can never
//! disagree with `--help`. `consul-leader generate-docs` (hidden) writes them into `man/` and
//! `completions/`; a unit test fails when the checked-in files drift from the code.

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Every generated file: its path relative to the repository root, and its contents.
pub fn render_all() -> io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    let root = Cli::command();
    let name = root.get_name().to_string();

    let mut page = Vec::new();
    clap_mangen::Man::new(root.clone()).render(&mut page)?;
    files.push((PathBuf::from(format!("man/{name}.1")), page));
    let version = root.get_version().unwrap_or_default().to_string();
    let subs: Vec<clap::Command> = root
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    for sub in subs {
        // Subcommand pages are named like git's: consul-leader-run(1).
        let sub_name = format!("{name}-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.name(sub_name.clone()).version(version.clone()))
            .render(&mut page)?;
        files.push((PathBuf::from(format!("man/{sub_name}.1")), page));
    }

    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), &name, &mut out);
        files.push((PathBuf::from(format!("completions/{file}")), out));
    }
    Ok(files)
}

/// Writes every generated file under `root`.
pub fn write_all(root: &Path) -> io::Result<()> {
    for (path, contents) in render_all()? {
        let path = root.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, contents)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_man_pages_and_completions_match_the_code() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut stale = Vec::new();
        for (path, contents) in render_all().unwrap() {
            if std::fs::read(root.join(&path)).ok().as_deref() != Some(contents.as_slice()) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "out of date: {}; regenerate with `cargo run -- generate-docs` and commit the result",
            stale.join(", ")
        );
    }
}
