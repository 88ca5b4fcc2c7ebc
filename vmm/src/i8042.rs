//! A minimal i8042 keyboard controller: enough for Linux to probe it quickly and for
//! `reboot=k` to end the VM (command 0xFE pulses the reset line).
//!
//! vm-superio's i8042 answers 0 to everything, which makes the kernel's probe time out
//! slowly; this one answers the self-test, the command byte and keyboard commands.

/// Data port.
pub const DATA: u16 = 0x60;
/// Status (read) and command (write) port.
pub const COMMAND: u16 = 0x64;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_UNLOCKED: u8 = 0x10;

/// The controller.
#[derive(Debug)]
pub struct I8042 {
    output: Option<u8>,
    command_byte: u8,
    expect_command_byte: bool,
    reset: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self {
            output: None,
            // Keyboard interrupt on, system flag, translation on.
            command_byte: 0x45,
            expect_command_byte: false,
            reset: false,
        }
    }
}

impl I8042 {
    /// Whether the guest asked for a reset.
    pub fn reset_requested(&self) -> bool {
        self.reset
    }

    /// A read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            COMMAND => {
                STATUS_SYSTEM_FLAG
                    | STATUS_UNLOCKED
                    | if self.output.is_some() {
                        STATUS_OUTPUT_FULL
                    } else {
                        0
                    }
            }
            _ => self.output.take().unwrap_or(0),
        }
    }

    /// A write of `value` to `port`.
    pub fn write(&mut self, port: u16, value: u8) {
        match (port, value) {
            (COMMAND, 0x20) => self.output = Some(self.command_byte),
            (COMMAND, 0x60) => self.expect_command_byte = true,
            (COMMAND, 0xaa) => self.output = Some(0x55), // controller self-test passed
            (COMMAND, 0xab) => self.output = Some(0x00), // keyboard interface test passed
            (COMMAND, 0xfe) => self.reset = true,
            (COMMAND, _) => {}
            (_, v) if self.expect_command_byte => {
                self.command_byte = v;
                self.expect_command_byte = false;
            }
            // A command to the keyboard itself: acknowledge it.
            _ => self.output = Some(0xfa),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_and_reset() {
        let mut k = I8042::default();
        assert_eq!(k.read(COMMAND) & STATUS_OUTPUT_FULL, 0);
        k.write(COMMAND, 0xaa);
        assert_eq!(k.read(COMMAND) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(k.read(DATA), 0x55);
        k.write(COMMAND, 0x60);
        k.write(DATA, 0x61);
        k.write(COMMAND, 0x20);
        assert_eq!(k.read(DATA), 0x61);
        k.write(DATA, 0xff);
        assert_eq!(k.read(DATA), 0xfa);
        assert!(!k.reset_requested());
        k.write(COMMAND, 0xfe);
        assert!(k.reset_requested());
    }
}
