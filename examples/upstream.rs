//! The example classifier server (TorchServe, KServe v1, OIP v2 and custom JSON/multipart APIs).
//! `cargo run --example upstream -- 127.0.0.1:8081`

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("example upstream on http://{}", listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    diffguard::upstream::serve(
        listener,
        diffguard::upstream::default_classifier(),
        shutdown,
    )
    .await?;
    Ok(())
}
