//! Pulling images from every source: a real OCI registry on 127.0.0.1 (Debian's
//! `docker-registry`, started and stopped here), an OCI layout, an OCI archive and a Docker
//! archive (made from the layout with `skopeo`). Needs `docker-registry`, `skopeo` and
//! `htpasswd` (`cargo xtask deps` installs them); fails with that reason without them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/test_image.rs"]
mod test_image;

use oci_bake::registry::ClientOptions;
use oci_bake::rootfs::listing;
use oci_bake::{ImageRef, PullError, PullOptions, Store};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is needed for this test (cargo xtask deps installs it)"
    );
}

// ---------- a registry on loopback ----------

struct Registry {
    child: Child,
    port: u16,
    data: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(dir: &Path, htpasswd: Option<&Path>) -> Registry {
    need("docker-registry");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = dir.join("registry-data");
    let auth = htpasswd
        .map(|p| {
            format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                p.display()
            )
        })
        .unwrap_or_default();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            data.display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start docker-registry");
    let reg = Registry { child, port, data };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the registry did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reg
}

fn skopeo(args: &[&str]) {
    need("skopeo");
    let out = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .expect("cannot run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn opts() -> PullOptions {
    PullOptions {
        progress: false,
        ..Default::default()
    }
}

fn pull(store: &Store, r: &str, o: &PullOptions) -> Result<oci_bake::ImageRecord, PullError> {
    oci_bake::pull(store, &r.parse::<ImageRef>().unwrap(), o)
}

#[test]
fn every_source_gives_the_same_root_filesystem() {
    let dir = scratch("sources");
    let layout = dir.join("layout");
    test_image::build_layout(&layout, "v1");
    let reg = start_registry(&dir, None);
    let remote = format!("127.0.0.1:{}/test/img:v1", reg.port);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{remote}"),
    ]);
    let oci_archive = dir.join("img-oci.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:v1", layout.display()),
        &format!("oci-archive:{}:v1", oci_archive.display()),
    ]);
    let docker_archive = dir.join("img-docker.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker-archive:{}:test/img:v1", docker_archive.display()),
    ]);

    let store = Store::open(dir.join("store")).unwrap();
    let sources = [
        format!("oci:{}:v1", layout.display()),
        format!("oci-archive:{}:v1", oci_archive.display()),
        format!("docker-archive:{}:test/img:v1", docker_archive.display()),
        remote.clone(),
        format!("docker://{remote}"),
    ];
    let mut listings = Vec::new();
    for s in &sources {
        let rec = pull(&store, s, &opts()).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(rec.run_config.entrypoint, ["/bin/sh", "-c"], "{s}");
        assert_eq!(rec.run_config.user, "1000:1000");
        assert_eq!(rec.run_config.exposed_ports, ["80/tcp"]);
        assert_eq!(rec.run_config.stop_signal, "SIGQUIT");
        listings.push((s, listing(&store.rootfs_path(&rec.rootfs)).unwrap()));
    }
    let first = &listings[0].1;
    for (s, l) in &listings[1..] {
        assert_eq!(l, first, "{s} differs from the layout");
    }
    let text = first.join("\n");
    assert!(!text.contains("/etc/gone"), "whiteout ignored:\n{text}");
    assert!(
        !text.contains("/opt/app/old") && !text.contains("/opt/app/sub"),
        "opaque dir ignored:\n{text}"
    );
    assert!(text.contains("/opt/app/new 644 0:0 file"), "{text}");
    assert!(text.contains("/bin/busybox 4755 0:0 file"), "{text}");
    assert!(text.contains("/bin/sh 777 0:0 symlink busybox"), "{text}");
    assert!(
        text.contains("/home/user/notes 600 1000:1000 file"),
        "{text}"
    );
    assert!(text.contains("/dev/null 666 0:0 char"), "{text}");
    assert!(
        text.contains("user:x:1000") || text.contains("/etc/passwd 644 0:0 file"),
        "{text}"
    );
    let ls = text.lines().find(|l| l.starts_with("/bin/ls ")).unwrap();
    let bb = text
        .lines()
        .find(|l| l.starts_with("/bin/busybox "))
        .unwrap();
    assert_eq!(
        ls.split(' ').next_back(),
        bb.split(' ').next_back(),
        "hard link content"
    );

    // Cached: a second pull reuses blobs and the root filesystem.
    let again = pull(&store, &remote, &opts()).unwrap();
    assert_eq!(
        store
            .images()
            .unwrap()
            .iter()
            .filter(|r| r.name == again.name)
            .count(),
        1
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn failures_are_distinct_clear_errors_and_leave_the_store_usable() {
    let dir = scratch("failures");
    let layout = dir.join("layout");
    test_image::build_layout(&layout, "v1");
    let reg = start_registry(&dir, None);
    let remote = format!("127.0.0.1:{}/test/img", reg.port);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{remote}:v1"),
    ]);
    let store = Store::open(dir.join("store")).unwrap();

    // Missing tag, missing repository.
    let e = pull(&store, &format!("{remote}:nope"), &opts()).unwrap_err();
    assert!(
        matches!(
            e,
            PullError::Registry(oci_bake::registry::RegistryError::ManifestNotFound { .. })
        ),
        "{e}"
    );
    let e = pull(
        &store,
        &format!("127.0.0.1:{}/no/such:v1", reg.port),
        &opts(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            PullError::Registry(oci_bake::registry::RegistryError::RepositoryNotFound { .. })
                | PullError::Registry(oci_bake::registry::RegistryError::ManifestNotFound { .. })
        ),
        "{e}"
    );
    let e = pull(&store, &format!("oci:{}:v2", layout.display()), &opts()).unwrap_err();
    assert!(matches!(e, PullError::TagNotFound { .. }), "{e}");

    // A corrupt blob served by the registry: the biggest layer's data, tampered on disk.
    let blobs = reg.data.join("docker/registry/v2/blobs/sha256");
    let mut biggest: Option<(u64, PathBuf)> = None;
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for b in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let data = b.unwrap().path().join("data");
            let len = std::fs::metadata(&data).unwrap().len();
            if biggest.as_ref().is_none_or(|(l, _)| len > *l) {
                biggest = Some((len, data));
            }
        }
    }
    let (_, victim) = biggest.unwrap();
    let good = std::fs::read(&victim).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&victim, &bad).unwrap();
    let e = pull(&store, &format!("{remote}:v1"), &opts()).unwrap_err();
    assert!(
        matches!(
            e,
            PullError::Store(oci_bake::store::StoreError::DigestMismatch { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("does not match"), "{e}");
    // Nothing half-written, and the next pull works once the registry serves good data.
    assert_eq!(
        std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
        0
    );
    std::fs::write(&victim, &good).unwrap();
    pull(&store, &format!("{remote}:v1"), &opts()).unwrap();

    // A truncated archive.
    let archive = dir.join("img.tar");
    skopeo(&[
        "copy",
        &format!("oci:{}:v1", layout.display()),
        &format!("oci-archive:{}:v1", archive.display()),
    ]);
    let bytes = std::fs::read(&archive).unwrap();
    std::fs::write(&archive, &bytes[..bytes.len() / 2]).unwrap();
    let fresh = Store::open(dir.join("store2")).unwrap();
    let e = pull(
        &fresh,
        &format!("oci-archive:{}:v1", archive.display()),
        &opts(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("truncated") || e.to_string().contains("No such file"),
        "{e}"
    );
    std::fs::write(&archive, &bytes).unwrap();
    pull(
        &fresh,
        &format!("oci-archive:{}:v1", archive.display()),
        &opts(),
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn registries_with_passwords() {
    need("htpasswd");
    let dir = scratch("auth");
    let layout = dir.join("layout");
    test_image::build_layout(&layout, "v1");
    let htpasswd = dir.join("htpasswd");
    let out = Command::new("htpasswd")
        .args(["-Bbn", "alice", "s3cret"])
        .output()
        .unwrap();
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let reg = start_registry(&dir, Some(&htpasswd));
    let remote = format!("127.0.0.1:{}/private/img:v1", reg.port);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:s3cret",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{remote}"),
    ]);
    let store = Store::open(dir.join("store")).unwrap();
    let auth_file = |user: &str, pass: &str| {
        use base64::Engine;
        let encode = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let p = dir.join(format!("auth-{user}.json"));
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{}"}}}}}}"#,
                reg.port,
                encode(&format!("{user}:{pass}"))
            ),
        )
        .unwrap();
        p
    };
    let with = |file: Option<PathBuf>| PullOptions {
        progress: false,
        client: ClientOptions {
            auth_file: Some(file.unwrap_or_else(|| dir.join("no-such-auth.json"))),
            ..Default::default()
        },
        ..Default::default()
    };
    let e = pull(&store, &remote, &with(None)).unwrap_err();
    assert!(
        matches!(
            e,
            PullError::Registry(oci_bake::registry::RegistryError::Unauthorized { .. })
        ),
        "{e}"
    );
    let e = pull(&store, &remote, &with(Some(auth_file("alice", "wrong")))).unwrap_err();
    assert!(
        matches!(
            e,
            PullError::Registry(oci_bake::registry::RegistryError::Unauthorized { .. })
        ),
        "{e}"
    );
    pull(&store, &remote, &with(Some(auth_file("alice", "s3cret")))).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_pull_images_rmi_prune() {
    let dir = scratch("cli");
    let layout = dir.join("layout");
    test_image::build_layout(&layout, "v1");
    let home = dir.join("home");
    let sm = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_supermachine"))
            .args(args)
            .env("SUPERMACHINE_HOME", &home)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let image = format!("oci:{}:v1", layout.display());
    let (code, out, err) = sm(&["pull", "-q", &image]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("digest: sha256:"), "{out}");
    let (_, out, _) = sm(&["images"]);
    assert!(out.contains("layout:v1"), "{out}");
    // Machine-readable: one JSON object per image, and inspect's array with the config.
    let (code, out, err) = sm(&["images", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    let digest = lines[0]["Digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{out}");
    assert!(lines[0]["Repository"]
        .as_str()
        .unwrap()
        .ends_with("layout:v1"));
    let (code, out, err) = sm(&["inspect", &image]);
    assert_eq!(code, 0, "{err}");
    let inspected: serde_json::Value = serde_json::from_str(&out).unwrap();
    let i = &inspected[0];
    assert_eq!(i["Digest"], digest.as_str());
    assert_eq!(
        i["Config"]["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"])
    );
    assert_eq!(i["Config"]["Cmd"], serde_json::json!(["echo hi"]));
    assert_eq!(i["Config"]["Env"], serde_json::json!(["PATH=/bin", "A=1"]));
    assert!(
        !i["RootFS"]["Layers"].as_array().unwrap().is_empty(),
        "{out}"
    );
    // A name that is nothing: status 1, said, and the others still printed.
    let (code, out, err) = sm(&["inspect", &image, "oci:/no/such:v1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no such VM or image: oci:/no/such:v1"),
        "{err}"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (code, _, err) = sm(&["rmi", "oci:/no/such:v1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no such image"), "{err}");
    let (code, out, _) = sm(&["rmi", &image]);
    assert_eq!(code, 0);
    assert!(out.contains("Untagged"), "{out}");
    let (code, out, _) = sm(&["prune"]);
    assert_eq!(code, 0);
    assert!(out.contains("Deleted 6 files"), "{out}");
    let (code, _, err) = sm(&["pull", "-q", "Bad Reference"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid image reference"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_volume_create_ls_rm() {
    let dir = scratch("cli-volume");
    let sm = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_supermachine"))
            .args(args)
            .env("SUPERMACHINE_HOME", dir.join("home"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = sm(&["volume", "create", "--size", "64m", "data"]);
    assert_eq!((code, out.trim()), (0, "data"), "{err}");
    let (code, out, _) = sm(&["volume", "ls"]);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("data ")), "{out}");
    let (code, _, err) = sm(&["volume", "create", "data"]);
    assert_eq!(code, 1);
    assert!(err.contains("volume data already exists"), "{err}");
    // Paths are not names: nothing is made or removed outside the volumes.
    let outside = dir.join("outside.ext4");
    std::fs::write(&outside, b"keep").unwrap();
    for cmd in ["create", "rm"] {
        let (code, _, err) = sm(&["volume", cmd, &dir.join("outside").display().to_string()]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("invalid volume name"), "{err}");
        let (code, _, err) = sm(&["volume", cmd, "../../outside"]);
        assert_eq!(code, 1, "{err}");
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    let (code, out, err) = sm(&["volume", "rm", "data"]);
    assert_eq!((code, out.trim()), (0, "data"), "{err}");
    let (_, out, _) = sm(&["volume", "ls"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (code, _, err) = sm(&["volume", "rm", "data"]);
    assert_eq!(code, 1);
    assert!(err.contains("data"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn registries_conf_mirrors_are_tried_in_order_and_blocks_refuse() {
    use oci_bake::registries_conf::RegistriesConf;
    let dir = scratch("registries-conf");
    let layout = dir.join("layout");
    test_image::build_layout(&layout, "v1");
    let reg = start_registry(&dir, None);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://127.0.0.1:{}/hub/team/app:v1", reg.port),
    ]);
    // A name that resolves nowhere, served by its second mirror (the first refuses
    // connections); a blocked prefix.
    let conf_text = format!(
        r#"
[[registry]]
prefix = "registry.example.invalid/team"
location = "registry.example.invalid/team"

[[registry.mirror]]
location = "127.0.0.1:1/broken"

[[registry.mirror]]
location = "127.0.0.1:{}/hub/team"

[[registry]]
prefix = "registry.example.invalid/forbidden"
blocked = true
"#,
        reg.port
    );
    let conf_path = dir.join("registries.conf");
    std::fs::write(&conf_path, &conf_text).unwrap();
    let conf = RegistriesConf::parse(&conf_text, &conf_path).unwrap();
    let with_conf = PullOptions {
        progress: false,
        client: ClientOptions {
            registries_conf: Some(conf),
            ..Default::default()
        },
        ..Default::default()
    };
    let store = Store::open(dir.join("store")).unwrap();
    let record = pull(&store, "registry.example.invalid/team/app:v1", &with_conf).unwrap();
    assert_eq!(record.name, "registry.example.invalid/team/app:v1");
    let e = pull(&store, "registry.example.invalid/forbidden/x:1", &with_conf).unwrap_err();
    assert!(matches!(e, PullError::Blocked { .. }), "{e}");
    assert!(e.to_string().contains("blocked in registries.conf"), "{e}");

    // The CLI reads the file the containers tools would ($CONTAINERS_REGISTRIES_CONF here).
    let sm = |args: &[&str], conf: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_supermachine"))
            .args(args)
            .env("SUPERMACHINE_HOME", dir.join("home"))
            .env("CONTAINERS_REGISTRIES_CONF", conf)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = sm(
        &["pull", "-q", "registry.example.invalid/team/app:v1"],
        &conf_path,
    );
    assert_eq!(code, 0, "{err}");
    let (code, err) = sm(
        &["pull", "-q", "registry.example.invalid/forbidden/x:1"],
        &conf_path,
    );
    assert_eq!(code, 1);
    assert!(err.contains("blocked in registries.conf"), "{err}");
    let broken = dir.join("broken.conf");
    std::fs::write(&broken, "[[registry]]\nlocation = 5\n").unwrap();
    let (code, err) = sm(
        &["pull", "-q", "registry.example.invalid/team/app:v1"],
        &broken,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("broken.conf") && err.contains("location must be a string"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
