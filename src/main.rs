use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = pgward::cli::Cli::parse();
    match pgward::cli::run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("pgward: {e:#}");
            std::process::exit(1);
        }
    }
}
