//! Configures the guest's network interface with socket ioctls: address, netmask, MTU, up,
//! default route, and `/etc/resolv.conf`. No netlink: these few settings do not need it.

use std::io;
use std::net::Ipv4Addr;

use guest_init::NetworkConfig;

/// A socket for interface ioctls, closed on drop.
struct IoctlSocket(libc::c_int);

impl Drop for IoctlSocket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (i, b) in name.bytes().enumerate() {
        req.ifr_name[i] = b as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; this is the documented
    // way to pass an IPv4 address through the generic type.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

impl IoctlSocket {
    fn new() -> io::Result<Self> {
        // SAFETY: plain socket creation.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(IoctlSocket(fd))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
        // SAFETY: every request used here takes a pointer to the struct type passed with it.
        if unsafe { libc::ioctl(self.0, request as _, arg as *mut T) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    }
}

/// Brings the interface up as `net` says.
pub fn configure(net: &NetworkConfig) -> io::Result<()> {
    let s = IoctlSocket::new()?;
    let name = &net.interface;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(net.address);
    s.ioctl(libc::SIOCSIFADDR, &mut req, &format!("address of {name}"))?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(net.prefix_len.min(32)))
        .unwrap_or(0);
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    s.ioctl(
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("netmask of {name}"),
    )?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = libc::c_int::from(net.mtu);
    s.ioctl(libc::SIOCSIFMTU, &mut req, &format!("MTU of {name}"))?;
    let mut req = ifreq(name)?;
    s.ioctl(libc::SIOCGIFFLAGS, &mut req, &format!("flags of {name}"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    s.ioctl(libc::SIOCSIFFLAGS, &mut req, &format!("bringing {name} up"))?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(net.gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    s.ioctl(libc::SIOCADDRT, &mut route, "default route")?;
    write_resolv_conf(net.dns)
}

/// The image's own resolver file points at servers this network may not reach: replace it
/// (as container engines do), a symlink included.
fn write_resolv_conf(dns: Ipv4Addr) -> io::Result<()> {
    let path = "/etc/resolv.conf";
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path)?;
    }
    std::fs::write(path, format!("nameserver {dns}\n"))
}
