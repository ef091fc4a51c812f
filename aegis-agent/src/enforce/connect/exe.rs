//! Where the connect programs find the caller's executable on this kernel.

use crate::kernel::btf::Btf;

/// Offsets the connect programs need to read the caller's executable, in the order of
/// the `CFG_OFF_*` config slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExeOffsets {
    pub task_mm: u64,
    pub mm_exe_file: u64,
    pub file_inode: u64,
    pub inode_ino: u64,
    pub inode_sb: u64,
    pub sb_dev: u64,
}

impl ExeOffsets {
    pub fn from_btf(btf: &Btf) -> anyhow::Result<Self> {
        Ok(Self {
            task_mm: btf.member_offset("task_struct", "mm")?,
            mm_exe_file: btf.member_offset("mm_struct", "exe_file")?,
            file_inode: btf.member_offset("file", "f_inode")?,
            inode_ino: btf.member_offset("inode", "i_ino")?,
            inode_sb: btf.member_offset("inode", "i_sb")?,
            sb_dev: btf.member_offset("super_block", "s_dev")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_offsets_are_found() {
        let btf = Btf::from_sys().expect("this kernel has BTF");
        let off = ExeOffsets::from_btf(&btf).unwrap();
        assert!(off.task_mm > 0 && off.task_mm < 8192, "{off:?}");
        assert!(off.mm_exe_file > 0 && off.mm_exe_file < 8192, "{off:?}");
        assert!(off.inode_ino > 0 && off.inode_sb > 0 && off.file_inode > 0, "{off:?}");
    }
}
