//! The shell completions and the manual page, from the real binary: generated from the same
//! command-line definition the agent parses, so they name its real commands and options.

use std::process::{Command, Output};

use aegis_tests::{TempDir, agent_bin};

fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin()).args(args).output().expect("starting aegis-agent")
}

fn stdout(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

/// bash loads the completion script and completes a command, and the options of a command
/// and of a nested command, with it.
#[test]
fn bash_completion_loads_and_completes_commands_and_options() {
    let script = stdout(&agent(&["completions", "bash"]));
    let check = r#"source /dev/stdin
complete -p aegis-agent
COMP_WORDS=(aegis-agent sca); COMP_CWORD=1; COMP_LINE="aegis-agent sca"; COMP_POINT=${#COMP_LINE}
_aegis_agent aegis-agent sca aegis-agent; echo "words: ${COMPREPLY[*]}"
COMP_WORDS=(aegis-agent block --rea); COMP_CWORD=2; COMP_LINE="aegis-agent block --rea"; COMP_POINT=${#COMP_LINE}
_aegis_agent aegis-agent --rea block; echo "options: ${COMPREPLY[*]}"
COMP_WORDS=(aegis-agent log verify --j); COMP_CWORD=3; COMP_LINE="aegis-agent log verify --j"; COMP_POINT=${#COMP_LINE}
_aegis_agent aegis-agent --j verify; echo "nested: ${COMPREPLY[*]}"
"#;
    let mut child = Command::new("bash")
        .args(["--norc", "-c", check])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.starts_with("complete ") && text.contains(" -F _aegis_agent aegis-agent\n"), "{text}");
    assert!(text.contains("words: scan"), "{text}");
    // Past a subcommand too (clap-rs/clap#6421 with a hyphenated name, worked around).
    assert!(text.contains("options: --reason"), "{text}");
    assert!(text.contains("nested: --json"), "{text}");
}

#[test]
fn zsh_and_fish_completions_name_the_commands() {
    let zsh = stdout(&agent(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef aegis-agent"), "{zsh}");
    let fish = stdout(&agent(&["completions", "fish"]));
    assert!(fish.contains("complete -c aegis-agent") && fish.contains("-a \"scan\""), "{fish}");
    let out = agent(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(64), "an unknown shell is a usage error: {out:?}");
}

/// The page renders (groff finds no error in it) and says what the commands and exit
/// statuses are; --dir writes a page per command.
#[test]
fn the_manual_page_renders_and_has_a_page_per_command() {
    let roff = stdout(&agent(&["man"]));
    assert!(roff.contains(".TH aegis-agent 1"), "{roff}");
    let mut child = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("groff");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), roff.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "groff: {}", String::from_utf8_lossy(&out.stderr));
    // The words, from the page's source (groff may break and hyphenate them when laid out).
    let text = roff.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "");
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    for says in ["aegis-agent", "scan", "block", "completions", "64 usage error"] {
        assert!(text.contains(says), "the page lacks {says:?}:\n{text}");
    }

    let dir = TempDir::new("man");
    let out = agent(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for page in ["aegis-agent.1", "aegis-agent-scan.1", "aegis-agent-block.1", "aegis-agent-log-verify.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}: {text}");
    }
    let scan = std::fs::read_to_string(dir.join("aegis-agent-scan.1")).unwrap();
    assert!(scan.contains("2 block"), "scan's page has its exit statuses: {scan}");
}
