# Sourced by kernel.sh and guest-kernel.sh: Debian sid's linux-source-7.2, fetched through a
# private apt configuration (the system's sources are never edited) and unpacked once into the
# cache. Needs $cache and log() from the caller.
#   source_version        prints the newest linux-source-7.2 version in sid (fails offline)
#   source_tree VERSION   prints the unpacked tree of VERSION, fetching it the first time

# Private apt configuration for sid, from the system's own mirror.
apt_dir=$cache/apt-sid
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || { log "no Debian mirror in the system's apt sources"; exit 1; }
printf 'Types: deb\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" > "$apt_dir/sid.sources"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sid.sources" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir" -o "Dir::Cache::archives=$apt_dir/archives"
          -o Dir::State::status=/dev/null -o APT::Sandbox::User=root -o Acquire::Languages=none)

source_version() {
    apt-get "${apt_opts[@]}" update -qq 2>/dev/null || return 1
    apt-cache "${apt_opts[@]}" show linux-source-7.2 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}

source_tree() {
    local version=$1 src=$cache/src-$1 deb
    if [ ! -f "$src/.extracted" ]; then
        log "fetching linux-source-7.2 $version"
        (cd "$apt_dir/archives" && apt-get "${apt_opts[@]}" download linux-source-7.2 >/dev/null)
        deb=$(ls -t "$apt_dir/archives"/linux-source-7.2_*.deb | head -1)
        rm -rf "$src" "$src.deb"
        mkdir -p "$src.deb" "$src"
        dpkg-deb -x "$deb" "$src.deb"
        tar -xf "$src.deb"/usr/src/linux-source-7.2.tar.xz -C "$src" --strip-components=1
        rm -rf "$src.deb"
        touch "$src/.extracted"
    fi
    echo "$src"
}
