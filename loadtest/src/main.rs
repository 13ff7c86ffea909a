//! `conclave-loadtest`: scenario-driven load generator (issue 6, not built yet).

fn main() -> std::process::ExitCode {
    eprintln!(
        "conclave-loadtest: not implemented yet (issue 6). \
         Nothing was measured."
    );
    std::process::ExitCode::from(2)
}
