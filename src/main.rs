use clap::Parser;

// Sessions allocate small, short-lived buffers on every worker thread; glibc's arena locks and
// consolidation showed up at the top of pgward's profile under load, mimalloc's per-thread heaps
// do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = pgward::cli::Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // Statements are analysed on the runtime's threads, and walking a syntax tree recurses
    // once per level: a deeper stack than the 2 MiB default keeps a wide margin under the
    // depth pgward parses at all (`sql::depth`). Reserved address space; pages are touched
    // only as deep as a walk goes.
    builder.thread_stack_size(8 * 1024 * 1024);
    if let Some(threads) = cli.worker_threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgward: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(pgward::cli::run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("pgward: {e:#}");
            std::process::exit(1);
        }
    }
}
