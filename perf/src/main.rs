fn main() {
    eprintln!("perf suite: not built yet (see issue 3)");
}
