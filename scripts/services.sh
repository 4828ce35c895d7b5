#!/usr/bin/env bash
# Starts and stops throwaway test servers on loopback, for medsync's test suites.
#
#   scripts/services.sh start pure-ftpd|pure-ftpd-tls|pure-ftpd-quota|proftpd|vsftpd|sshd <statedir>
#   scripts/services.sh restart <statedir> <name> [seconds-down]
#   scripts/services.sh install <name>...
#   scripts/services.sh stop <statedir>
#
# `start` installs the Debian package if it is missing (needs root and apt), creates a throwaway
# user and a root folder inside <statedir>, starts the server on 127.0.0.1 and a free port, waits
# until it accepts connections and writes <statedir>/<name>.json:
#   {host, port, user, password, root, pid, tls, cert, uid, gid, systemUser, log}
# `root` is the local folder the FTP user sees as `/`; new folders in it should be owned by uid:gid.
# `restart` kills one server started in <statedir> (its whole process group: sessions in flight
# are cut), waits [seconds-down] (default 0) and starts it again on the same port, as a server
# crash and restart would look to a client. pure-ftpd-quota is pure-ftpd with a virtual quota of
# $MEDSYNC_FTP_QUOTA (files:megabytes, default 1000:1): uploads past it get 552.
# `start sshd` starts OpenSSH (SFTP) instead and writes <statedir>/sshd.json (see start_sshd).
# `stop` kills every server started in <statedir> and removes the system users it created.
# `install` only installs what the named servers need (the tests' global setup runs it once, so
# test files that start servers in parallel never wait on apt's lock).
#
# pure-ftpd and vsftpd conflict in Debian (both provide ftp-server): whichever is not installed
# is unpacked (apt-get download + dpkg-deb -x) into $MEDSYNC_SERVICES_CACHE instead, with its
# other dependencies installed by apt-get (apt-get runs with --no-remove, so it never swaps one
# for the other). Nothing is enabled as a system service.
set -euo pipefail

CACHE=${MEDSYNC_SERVICES_CACHE:-/var/cache/medsync-services}
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q --no-install-recommends --no-remove -o DPkg::Lock::Timeout=600)

die() {
  echo "services.sh: $*" >&2
  exit 1
}

usage() {
  echo "usage: $0 start pure-ftpd|pure-ftpd-tls|pure-ftpd-quota|proftpd|vsftpd|sshd <statedir>" >&2
  echo "       $0 restart <statedir> <name> [seconds-down]" >&2
  echo "       $0 install <name>..." >&2
  echo "       $0 stop <statedir>" >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------
# Installing

APT_UPDATED=0
apt_install() {
  [ "$(id -u)" = 0 ] || die "installing $* needs root"
  command -v apt-get >/dev/null || die "installing $* needs apt-get"
  # Never let a package start its own service (on port 21) while installing.
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  apt-get install "${APT_OPTS[@]}" "$@" >&2 || rc=$?
  if [ "$rc" != 0 ] && [ "$APT_UPDATED" = 0 ]; then
    APT_UPDATED=1
    apt-get update -q >&2 || true
    rc=0
    apt-get install "${APT_OPTS[@]}" "$@" >&2 || rc=$?
  fi
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return "$rc"
}

# Unpacks a package into $CACHE/<pkg> without running its scripts, and apt-installs its
# dependencies (first alternative of each).
unpack_pkg() {
  local pkg=$1 work deb deps=() d
  work=$(mktemp -d)
  (cd "$work" && apt-get download "$pkg" >&2) || {
    apt-get update -q >&2 || true
    (cd "$work" && apt-get download "$pkg" >&2)
  }
  deb=$(ls "$work"/*.deb)
  while IFS= read -r d; do
    d=${d%%|*}
    d=${d%%(*}
    d=${d//[[:space:]]/}
    d=${d%%:any}
    [ -n "$d" ] || continue
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' || deps+=("$d")
  done < <(dpkg-deb -f "$deb" Pre-Depends Depends | sed 's/^[A-Za-z-]*: //' | tr ',' '\n')
  if [ "${#deps[@]}" -gt 0 ]; then apt_install "${deps[@]}"; fi
  rm -rf "${CACHE:?}/$pkg.tmp"
  mkdir -p "$CACHE"
  dpkg-deb -x "$deb" "$CACHE/$pkg.tmp"
  rm -rf "${CACHE:?}/$pkg"
  mv "$CACHE/$pkg.tmp" "$CACHE/$pkg"
  rm -rf "$work"
}

# Prints the path of program <bin> from package <pkg>, installing the package if needed.
need() {
  local pkg=$1 bin=$2 dir p
  for dir in /usr/sbin /usr/bin /sbin /bin; do
    [ -x "$dir/$bin" ] && { echo "$dir/$bin"; return; }
  done
  for p in "$CACHE/$pkg/usr/sbin/$bin" "$CACHE/$pkg/usr/bin/$bin"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  if ! apt_install "$pkg"; then
    echo "services.sh: apt-get install $pkg failed (conflict?); unpacking it into $CACHE/$pkg" >&2
    unpack_pkg "$pkg"
  fi
  for p in "/usr/sbin/$bin" "/usr/bin/$bin" "$CACHE/$pkg/usr/sbin/$bin" "$CACHE/$pkg/usr/bin/$bin"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  die "no $bin after installing $pkg"
}

# ---------------------------------------------------------------------------------------------
# Helpers

free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
  else
    node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
  fi
}

# A random 200-port passive range between 10000 and 20000 whose first and last ports are free.
# Below the kernel's ephemeral ports (net.ipv4.ip_local_port_range, 32768-60999 by default): a
# client socket that happens to get a port in the range blocks the server's bind of that port for
# as long as it lives (vsftpd gives up after 9 busy ports in a row: "500 OOPS: vsf_sysutil_bind"),
# and tests open thousands of connections. The in-process ftp-srv of the tests uses 20000-30999.
pasv_range() {
  local lo i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    lo=$((10000 + (RANDOM % 50) * 200))
    if ! port_open "$lo" && ! port_open $((lo + 199)); then break; fi
  done
  echo "$lo $((lo + 199))"
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() {
  local port=$1 pid=$2 log=$3 i
  for i in $(seq 1 100); do
    port_open "$port" && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2 || true; die "server exited before listening (log: $log)"; }
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  cat "$log" >&2 || true
  die "nothing listens on 127.0.0.1:$port after 10 s (log: $log)"
}

rand() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  printf '"%s"' "$s"
}

write_json() {
  # name host port user password root pid tls cert uid gid systemUser log
  local f="$STATEDIR/$1.json"
  {
    printf '{"host":%s,"port":%s,"user":%s,"password":%s,"root":%s,"pid":%s,"tls":%s,' \
      "$(json_str "$2")" "$3" "$(json_str "$4")" "$(json_str "$5")" "$(json_str "$6")" "$7" "$8"
    printf '"cert":%s,"uid":%s,"gid":%s,"systemUser":%s,"log":%s}\n' \
      "$([ -n "$9" ] && json_str "$9" || echo null)" "${10}" "${11}" \
      "$([ -n "${12}" ] && json_str "${12}" || echo null)" "$(json_str "${13}")"
  } >"$f.tmp"
  mv "$f.tmp" "$f"
  echo "$f"
}

make_cert() {
  command -v openssl >/dev/null || apt_install openssl
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
    -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth \
    -keyout "$1.key" -out "$1.crt" 2>/dev/null
  cat "$1.key" "$1.crt" >"$1.pem"
  chmod 600 "$1.key" "$1.pem"
}

# Starts a program detached (own session, no inherited stdio) and prints its pid.
spawn() {
  local log=$1
  shift
  setsid "$@" </dev/null >"$log" 2>&1 &
  echo $!
}

# ---------------------------------------------------------------------------------------------
# Servers

start_pure_ftpd() {
  local name=$1 tls=$2 quota=${3:-} bin pw dir uid=65534 gid=65534 port lo hi pid log args cert=""
  bin=$(need pure-ftpd pure-ftpd)
  pw=$(dirname "$bin")/../bin/pure-pw
  [ -x "$pw" ] || pw=$(command -v pure-pw)
  dir="$STATEDIR/$name"
  mkdir -p "$dir/root"
  chown "$uid:$gid" "$dir/root"
  local user="ms_$(rand 4)" pass="pw-$(rand 12)"
  rm -f "$dir/passwd" "$dir/passwd.pdb"
  # The line `pure-pw useradd USER -u UID -g GID -d ROOT -f PASSWD` writes, but with a SHA-512
  # crypt hash: pure-pw's argon2id hash (t=1023) makes every login take ~4 s on a busy 2-core box.
  command -v openssl >/dev/null || apt_install openssl
  printf '%s:%s:%s:%s::%s/./::::::::::::\n' "$user" "$(printf %s "$pass" | openssl passwd -6 -stdin)" "$uid" "$gid" \
    "$dir/root" >"$dir/passwd"
  chmod 600 "$dir/passwd"
  "$pw" mkdb "$dir/passwd.pdb" -f "$dir/passwd" >/dev/null
  port=$(free_port)
  read -r lo hi < <(pasv_range)
  log="$dir/server.log"
  # -E no anonymous, -A chroot everyone, -H no DNS, -P passive address, -u 1 allows uid 65534,
  # -z show dot files (the adapter's hidden .medsync-part files) in listings, -c/-C connection caps.
  args=(-l "puredb:$dir/passwd.pdb" -S "127.0.0.1,$port" -p "$lo:$hi" -P 127.0.0.1 -E -A -H -z
    -u 1 -c 100 -C 100 -U 133:022)
  if [ "$tls" = 1 ]; then
    make_cert "$dir/cert"
    cert=$(cat "$dir/cert.crt")
    args+=(-Y 1 -2 "$dir/cert.pem")
  fi
  [ -n "$quota" ] && args+=(-n "$quota")
  printf '%q ' "$bin" "${args[@]}" >"$dir/cmd"
  pid=$(spawn "$log" "$bin" "${args[@]}")
  wait_port "$port" "$pid" "$log"
  write_json "$name" 127.0.0.1 "$port" "$user" "$pass" "$dir/root" "$pid" \
    "$([ "$tls" = 1 ] && echo true || echo false)" "$cert" "$uid" "$gid" "" "$log"
}

start_vsftpd() {
  local name=$1 bin dir port lo hi pid log user pass uid gid pamsvc=vsftpd
  bin=$(need vsftpd vsftpd)
  # The package's PAM file; an unpacked package has not installed it.
  if [ ! -e /etc/pam.d/vsftpd ]; then
    if [ -e "$CACHE/vsftpd/etc/pam.d/vsftpd" ]; then
      cp "$CACHE/vsftpd/etc/pam.d/vsftpd" /etc/pam.d/vsftpd
    else
      pamsvc=other
    fi
  fi
  dir="$STATEDIR/$name"
  mkdir -p "$dir/root" "$dir/empty"
  chmod 755 "$dir/empty"
  user="msftp_$(rand 4)"
  pass="pw-$(rand 12)"
  useradd -M -d "$dir/root" -s /bin/sh "$user"
  printf '%s:%s\n' "$user" "$pass" | chpasswd
  echo "$user" >"$dir/system-user"
  uid=$(id -u "$user")
  gid=$(id -g "$user")
  chown "$uid:$gid" "$dir/root"
  port=$(free_port)
  read -r lo hi < <(pasv_range)
  log="$dir/server.log"
  cat >"$dir/vsftpd.conf" <<EOF
listen=YES
listen_ipv6=NO
listen_address=127.0.0.1
listen_port=$port
background=NO
anonymous_enable=NO
local_enable=YES
write_enable=YES
local_umask=022
local_root=$dir/root
chroot_local_user=YES
allow_writeable_chroot=YES
secure_chroot_dir=$dir/empty
pam_service_name=$pamsvc
userlist_enable=NO
tcp_wrappers=NO
pasv_enable=YES
pasv_address=127.0.0.1
pasv_min_port=$lo
pasv_max_port=$hi
pasv_promiscuous=NO
port_enable=YES
force_dot_files=YES
hide_ids=NO
seccomp_sandbox=NO
isolate=NO
isolate_network=NO
max_clients=100
max_per_ip=100
xferlog_enable=NO
dual_log_enable=NO
vsftpd_log_file=$dir/vsftpd.log
utf8_filesystem=YES
EOF
  pid=$(spawn "$log" "$bin" "$dir/vsftpd.conf")
  wait_port "$port" "$pid" "$log"
  write_json "$name" 127.0.0.1 "$port" "$user" "$pass" "$dir/root" "$pid" false "" \
    "$uid" "$gid" "$user" "$log"
}

# ProFTPD with mod_digest, the server that offers digests (HASH, XSHA256, XMD5: the adapter
# checks uploads with them), MLSD and MFMT. Virtual user in an AuthUserFile (SHA-512 crypt).
start_proftpd() {
  local name=proftpd bin moddir dir port lo hi pid log user pass uid=65534 gid=65534
  bin=$(need proftpd-core proftpd)
  moddir=$(cd "$(dirname "$bin")/../lib/proftpd" 2>/dev/null && pwd) || moddir=/usr/lib/proftpd
  [ -f "$moddir/mod_digest.so" ] || die "no mod_digest.so in $moddir"
  dir="$STATEDIR/$name"
  mkdir -p "$dir/root"
  chown "$uid:$gid" "$dir/root"
  user="ms_$(rand 4)"
  pass="pw-$(rand 12)"
  command -v openssl >/dev/null || apt_install openssl
  printf '%s:%s:%s:%s::%s:/bin/sh\n' "$user" "$(printf %s "$pass" | openssl passwd -6 -stdin)" "$uid" "$gid" \
    "$dir/root" >"$dir/passwd"
  printf 'msgroup:x:%s:\n' "$gid" >"$dir/group"
  chmod 600 "$dir/passwd" "$dir/group"
  port=$(free_port)
  read -r lo hi < <(pasv_range)
  log="$dir/server.log"
  cat >"$dir/proftpd.conf" <<EOF
ServerName "medsync test"
ServerType standalone
DefaultServer on
Port $port
DefaultAddress 127.0.0.1
SocketBindTight on
UseIPv6 off
User nobody
Group nogroup
Umask 022
PidFile $dir/proftpd.pid
ScoreboardFile $dir/scoreboard
WtmpLog off
UseReverseDNS off
RequireValidShell off
AuthOrder mod_auth_file.c
AuthUserFile $dir/passwd
AuthGroupFile $dir/group
DefaultRoot ~
AllowOverwrite on
AllowStoreRestart on
PassivePorts $lo $hi
MaxInstances 100
ListOptions "-a"
SystemLog $dir/proftpd.log
TransferLog none
ModulePath $moddir
LoadModule mod_digest.c
DigestEngine on
DigestAlgorithms all
EOF
  printf '%q ' "$bin" -n -c "$dir/proftpd.conf" >"$dir/cmd"
  pid=$(spawn "$log" "$bin" -n -c "$dir/proftpd.conf")
  wait_port "$port" "$pid" "$log"
  write_json "$name" 127.0.0.1 "$port" "$user" "$pass" "$dir/root" "$pid" false "" "$uid" "$gid" "" "$log"
}

# Installs (or unpacks) what server <name> needs, without starting it.
install_one() {
  case "$1" in
    pure-ftpd | pure-ftpd-tls | pure-ftpd-quota)
      need pure-ftpd pure-ftpd >/dev/null
      command -v openssl >/dev/null || apt_install openssl
      ;;
    proftpd)
      need proftpd-core proftpd >/dev/null
      command -v openssl >/dev/null || apt_install openssl
      ;;
    vsftpd) need vsftpd vsftpd >/dev/null ;;
    sshd)
      command -v ssh-keygen >/dev/null || apt_install openssh-client
      need openssh-server sshd >/dev/null
      [ -x /usr/lib/openssh/sftp-server ] || apt_install openssh-sftp-server
      ;;
    *) usage ;;
  esac
}

# Kills the process group of server <name>, waits until it is gone, sleeps <down> seconds, then
# starts the command saved in <name>/cmd again and records the new pid.
restart_one() {
  local name=$1 down=${2:-0} f pid port log i
  local -a cmd
  f="$STATEDIR/$name.json"
  [ -f "$f" ] && [ -f "$STATEDIR/$name/cmd" ] || die "no server $name in $STATEDIR"
  pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$f")
  port=$(sed -n 's/.*"port":\([0-9]*\).*/\1/p' "$f")
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  sleep "$down"
  eval "cmd=($(cat "$STATEDIR/$name/cmd"))"
  log="$STATEDIR/$name/server.log"
  # The listening port may linger for a moment after the kill: retry the start for a few seconds.
  for i in $(seq 1 30); do
    pid=$(spawn "$log" "${cmd[@]}")
    sleep 0.2
    kill -0 "$pid" 2>/dev/null && break
  done
  wait_port "$port" "$pid" "$log"
  sed -i "s/\"pid\":[0-9]*/\"pid\":$pid/" "$f"
}

# OpenSSH's sshd on 127.0.0.1 and a free port, SFTP through the packaged sftp-server, its own
# config and ed25519 host key in <statedir>/sshd, and a throwaway user that logs in with a
# password or an ed25519 key (OpenSSH format). Writes <statedir>/sshd.json:
#   {host, port, user, password, privateKey (path), publicKey, root (the user's home, where SFTP
#    sessions start), hostFingerprint (SHA256:…), knownHostsLine, pid, uid, gid, systemUser, log}
start_sshd() {
  local bin sftp=/usr/lib/openssh/sftp-server dir port pid log user pass uid gid fp hostpub f
  command -v ssh-keygen >/dev/null || apt_install openssh-client
  bin=$(need openssh-server sshd)
  [ -x "$sftp" ] || apt_install openssh-sftp-server
  [ -x "$sftp" ] || die "no $sftp after installing openssh-sftp-server"
  # Privilege separation: sshd wants this folder (the package's service would create it).
  mkdir -p /run/sshd
  chmod 755 /run/sshd
  dir="$STATEDIR/sshd"
  mkdir -p "$dir/home"
  user="mssftp_$(rand 4)"
  pass="pw-$(rand 12)"
  useradd -M -d "$dir/home" -s /bin/sh "$user"
  printf '%s:%s\n' "$user" "$pass" | chpasswd
  echo "$user" >"$dir/system-user"
  uid=$(id -u "$user")
  gid=$(id -g "$user")
  chown "$uid:$gid" "$dir/home"
  chmod 755 "$dir/home"
  ssh-keygen -q -t ed25519 -N '' -C medsync-test-host -f "$dir/host_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C "$user@medsync-test" -f "$dir/client_ed25519"
  cp "$dir/client_ed25519.pub" "$dir/authorized_keys"
  chmod 644 "$dir/authorized_keys"
  port=$(free_port)
  log="$dir/server.log"
  cat >"$dir/sshd_config" <<EOF
ListenAddress 127.0.0.1:$port
HostKey $dir/host_ed25519
PidFile $dir/sshd.pid
UsePAM no
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile $dir/authorized_keys
StrictModes no
PermitRootLogin no
AllowUsers $user
MaxStartups 100:30:200
MaxSessions 64
UseDNS no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
LogLevel VERBOSE
Subsystem sftp $sftp
EOF
  "$bin" -t -f "$dir/sshd_config" >&2 || die "sshd rejects $dir/sshd_config"
  # -D: stay in the foreground (spawn() detaches it); -e: log to stderr, i.e. the log file.
  # sshd re-executes itself, so it is started by its absolute path (need prints one).
  printf '%q ' "$bin" -D -e -f "$dir/sshd_config" >"$dir/cmd"
  pid=$(spawn "$log" "$bin" -D -e -f "$dir/sshd_config")
  wait_port "$port" "$pid" "$log"
  fp=$(ssh-keygen -l -E sha256 -f "$dir/host_ed25519.pub" | awk '{print $2}')
  hostpub=$(awk '{print $1" "$2}' "$dir/host_ed25519.pub")
  f="$STATEDIR/sshd.json"
  {
    printf '{"host":"127.0.0.1","port":%s,"user":%s,"password":%s,' "$port" "$(json_str "$user")" \
      "$(json_str "$pass")"
    printf '"privateKey":%s,"publicKey":%s,"root":%s,' "$(json_str "$dir/client_ed25519")" \
      "$(json_str "$(cat "$dir/client_ed25519.pub")")" "$(json_str "$dir/home")"
    printf '"hostFingerprint":%s,"knownHostsLine":%s,' "$(json_str "$fp")" \
      "$(json_str "[127.0.0.1]:$port $hostpub")"
    printf '"pid":%s,"uid":%s,"gid":%s,"systemUser":%s,"log":%s}\n' "$pid" "$uid" "$gid" \
      "$(json_str "$user")" "$(json_str "$log")"
  } >"$f.tmp"
  mv "$f.tmp" "$f"
  echo "$f"
}

stop_all() {
  local f pid user d i
  shopt -s nullglob
  for f in "$STATEDIR"/*.json; do
    pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$f")
    [ -n "$pid" ] || continue
    # spawn() made the server a session and process-group leader: its group is what we started
    # (the server and its per-connection processes).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  for d in "$STATEDIR"/*/; do
    if [ -f "$d/system-user" ]; then
      user=$(cat "$d/system-user")
      if id "$user" >/dev/null 2>&1; then
        for i in $(seq 1 20); do
          userdel "$user" 2>/dev/null && break
          sleep 0.2
        done
        id "$user" >/dev/null 2>&1 && userdel -f "$user" 2>/dev/null || true
      fi
      rm -f "$d/system-user"
    fi
  done
}

# ---------------------------------------------------------------------------------------------

[ $# -ge 1 ] || usage
case "$1" in
  start)
    [ $# -eq 3 ] || usage
    STATEDIR=$(mkdir -p "$3" && cd "$3" && pwd)
    # The servers' users must be able to reach their root folder inside STATEDIR.
    chmod 755 "$STATEDIR"
    case "$2" in
      pure-ftpd) start_pure_ftpd pure-ftpd 0 ;;
      pure-ftpd-tls) start_pure_ftpd pure-ftpd-tls 1 ;;
      pure-ftpd-quota) start_pure_ftpd pure-ftpd-quota 0 "${MEDSYNC_FTP_QUOTA:-1000:1}" ;;
      proftpd) start_proftpd ;;
      vsftpd) start_vsftpd vsftpd ;;
      sshd) start_sshd ;;
      *) usage ;;
    esac
    ;;
  install)
    [ $# -ge 2 ] || usage
    shift
    for name in "$@"; do install_one "$name"; done
    ;;
  restart)
    [ $# -ge 3 ] && [ $# -le 4 ] || usage
    STATEDIR=$(cd "$2" && pwd)
    restart_one "$3" "${4:-0}"
    ;;
  stop)
    [ $# -eq 2 ] || usage
    [ -d "$2" ] || exit 0
    STATEDIR=$(cd "$2" && pwd)
    stop_all
    ;;
  *) usage ;;
esac
